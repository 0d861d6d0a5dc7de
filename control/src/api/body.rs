//! Request bodies: `{"<singular>": {...}}`, read field by field so every
//! problem is reported the way Octavia does, naming the field and value.
//! An attribute the object does not have is refused (as WSME does); an
//! explicit `null` is told apart from an absent field, because on update
//! `null` clears a value.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use siphon_proto::words::Word;

use super::fault::Fault;

/// A field as sent: absent, `null`, or a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field<T> {
    Absent,
    Null,
    Set(T),
}

impl<T> Field<T> {
    /// The value, or `default` when absent or null.
    pub fn or(self, default: T) -> T {
        match self {
            Field::Set(v) => v,
            _ => default,
        }
    }

    pub fn set(self) -> Option<T> {
        match self {
            Field::Set(v) => Some(v),
            _ => None,
        }
    }

    /// For updates: `Some(new value)` when the field was sent (null →
    /// `None`), `None` when it was not.
    pub fn update(self) -> Option<Option<T>> {
        match self {
            Field::Absent => None,
            Field::Null => Some(None),
            Field::Set(v) => Some(Some(v)),
        }
    }
}

#[derive(Debug)]
pub struct Body {
    map: Map<String, Value>,
    taken: BTreeSet<String>,
    /// The field this body sits in, for a nested object.
    within: Option<String>,
}

/// Unwraps `{"<key>": {...}}`.
pub fn parse(bytes: &[u8], key: &str) -> Result<Body, Fault> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| Fault::bad_request(format!("Invalid JSON body: {e}")))?;
    let Value::Object(mut outer) = v else {
        return Err(Fault::bad_request("The body must be a JSON object."));
    };
    match outer.remove(key) {
        Some(Value::Object(map)) if outer.is_empty() => Ok(Body {
            map,
            taken: BTreeSet::new(),
            within: None,
        }),
        Some(_) if outer.is_empty() => Err(Fault::bad_request(format!(
            "Invalid input: \"{key}\" must be an object."
        ))),
        _ => Err(Fault::bad_request(format!(
            "Invalid input: the body must be {{\"{key}\": {{...}}}}."
        ))),
    }
}

impl Body {
    /// A body built from an object that sits inside another one (a
    /// member of a batch, a listener inside a load balancer create).
    pub fn from_value(v: Value, what: &str) -> Result<Body, Fault> {
        match v {
            Value::Object(map) => Ok(Body {
                map,
                taken: BTreeSet::new(),
                within: Some(what.to_owned()),
            }),
            other => Err(Fault::invalid(what, other, "It must be an object.")),
        }
    }

    fn raw(&mut self, key: &str) -> Field<Value> {
        self.taken.insert(key.to_owned());
        match self.map.get(key) {
            None => Field::Absent,
            Some(Value::Null) => Field::Null,
            Some(v) => Field::Set(v.clone()),
        }
    }

    pub fn string(&mut self, key: &str, max_len: usize) -> Result<Field<String>, Fault> {
        Ok(match self.raw(key) {
            Field::Set(Value::String(s)) => {
                if s.chars().count() > max_len {
                    return Err(Fault::invalid(
                        key,
                        &s,
                        &format!("Value should have a maximum character requirement of {max_len}"),
                    ));
                }
                Field::Set(s)
            }
            Field::Set(v) => return Err(Fault::invalid(key, v, "Wrong type. Expected 'str'")),
            Field::Null => Field::Null,
            Field::Absent => Field::Absent,
        })
    }

    pub fn bool(&mut self, key: &str) -> Result<Field<bool>, Fault> {
        Ok(match self.raw(key) {
            Field::Set(Value::Bool(b)) => Field::Set(b),
            // WSME takes the usual spellings of booleans as strings too.
            Field::Set(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Field::Set(true),
                "false" | "0" | "no" | "off" => Field::Set(false),
                _ => return Err(Fault::invalid(key, s, "Wrong type. Expected 'bool'")),
            },
            Field::Set(v) => return Err(Fault::invalid(key, v, "Wrong type. Expected 'bool'")),
            Field::Null => Field::Null,
            Field::Absent => Field::Absent,
        })
    }

    /// An integer within `min..=max`.
    pub fn int(&mut self, key: &str, min: i64, max: i64) -> Result<Field<i64>, Fault> {
        Ok(match self.raw(key) {
            Field::Set(v) => {
                let n = match &v {
                    Value::Number(n) => n.as_i64(),
                    Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                };
                let Some(n) = n else {
                    return Err(Fault::invalid(key, v, "Wrong type. Expected 'int'"));
                };
                if n < min {
                    return Err(Fault::invalid(
                        key,
                        n,
                        &format!("Value should be greater or equal to {min}"),
                    ));
                }
                if n > max {
                    return Err(Fault::invalid(
                        key,
                        n,
                        &format!("Value should be lower or equal to {max}"),
                    ));
                }
                Field::Set(n)
            }
            Field::Null => Field::Null,
            Field::Absent => Field::Absent,
        })
    }

    /// One of `T`'s words, typed. `refused` are Octavia's words for what
    /// this provider cannot honour (501, unsupported); any other word is
    /// invalid (400, listing both).
    pub fn word<T: Word>(&mut self, key: &str, refused: &[&str]) -> Result<Field<T>, Fault> {
        Ok(match self.string(key, 255)? {
            Field::Set(s) => match T::parse(&s) {
                Some(w) => Field::Set(w),
                None if refused.contains(&s.as_str()) => {
                    let field = match &self.within {
                        Some(outer) => format!("{outer}.{key}"),
                        None => key.to_owned(),
                    };
                    return Err(Fault::unsupported(format!("{field} = {s}")));
                }
                None => {
                    let mut all: Vec<&str> = T::ALL.iter().map(|w| w.as_str()).collect();
                    all.extend(refused);
                    return Err(Fault::invalid(
                        key,
                        &s,
                        &format!("Value should be one of: {}", all.join(", ")),
                    ));
                }
            },
            Field::Null => Field::Null,
            Field::Absent => Field::Absent,
        })
    }

    pub fn strings(&mut self, key: &str) -> Result<Field<Vec<String>>, Fault> {
        Ok(match self.raw(key) {
            Field::Set(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for i in items {
                    match i {
                        Value::String(s) => out.push(s),
                        other => {
                            return Err(Fault::invalid(key, other, "Wrong type. Expected 'str'"))
                        }
                    }
                }
                Field::Set(out)
            }
            Field::Set(v) => return Err(Fault::invalid(key, v, "Wrong type. Expected 'list'")),
            Field::Null => Field::Null,
            Field::Absent => Field::Absent,
        })
    }

    /// Any JSON value, for nested objects read separately.
    pub fn value(&mut self, key: &str) -> Field<Value> {
        self.raw(key)
    }

    /// A field Octavia has that this provider cannot honour: fine when
    /// absent, null or empty, 501 otherwise.
    pub fn unsupported(&mut self, key: &str) -> Result<(), Fault> {
        match self.raw(key) {
            Field::Absent | Field::Null => Ok(()),
            Field::Set(v) if is_empty(&v) => Ok(()),
            Field::Set(v) => Err(Fault::unsupported(format!("{key} = {v}"))),
        }
    }

    /// Fields allowed on create but not on update get this on update.
    pub fn immutable(&mut self, key: &str) -> Result<(), Fault> {
        match self.raw(key) {
            Field::Absent => Ok(()),
            _ => Err(Fault::bad_request(format!(
                "Invalid input for field/attribute {key}: it cannot be changed after creation."
            ))),
        }
    }

    /// Refuses whatever was sent that no reader asked for.
    pub fn finish(self) -> Result<(), Fault> {
        let unknown: Vec<&str> = self
            .map
            .keys()
            .filter(|k| !self.taken.contains(*k))
            .map(String::as_str)
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(Fault::bad_request(format!(
                "Unknown attribute for argument: {}",
                unknown.join(", ")
            )))
        }
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(_) => false,
    }
}
