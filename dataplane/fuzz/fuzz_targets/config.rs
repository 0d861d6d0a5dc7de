//! The config parser: any bytes, read as a TOML and as a JSON document,
//! parsed into a `Config` and validated, as a file, SIGHUP or
//! `PUT /v1/config` would. Nothing may panic; every error must render; a
//! parsed config must survive a JSON round trip unchanged (what
//! `GET /v1/config` serves is what was applied), and validate the same way
//! after it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use siphon_dataplane::config::load::Format;
use siphon_dataplane::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for format in [Format::Toml, Format::Json] {
        match Config::parse_at(text, format) {
            Ok(config) => check(&config),
            Err(e) => {
                // What the API and `check` print.
                let _ = e.to_string();
            }
        }
    }
});

fn check(config: &Config) {
    let verdict = config.validate();
    if let Err(errors) = &verdict {
        assert!(!errors.0.is_empty(), "an error without a problem");
        for e in &errors.0 {
            let _ = (e.object.to_string(), e.problem.to_string());
        }
        let _ = errors.to_string();
    }
    let json = serde_json::to_string(config).expect("a parsed config serialises");
    let back = Config::parse_at(&json, Format::Json)
        .unwrap_or_else(|e| panic!("its own JSON does not parse: {e}\n{json}"));
    assert_eq!(&back, config, "the JSON round trip changed the config");
    assert_eq!(
        back.validate().is_ok(),
        verdict.is_ok(),
        "the JSON round trip changed the verdict"
    );
}
