//! List queries as Octavia takes them: filters on any attribute, `fields`,
//! `sort` (or `sort_key`/`sort_dir`), and `limit`/`marker`/`page_reverse`
//! pagination with `<plural>_links`.

use std::cmp::Ordering;

use serde_json::{json, Map, Value};

use super::fault::Fault;

/// Octavia's page size when `limit` is not given, and the largest allowed.
pub const MAX_PAGE_SIZE: usize = 1000;

/// The parsed query string.
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    /// (attribute, wanted values): an object matches if the attribute
    /// equals any of the values given for it.
    pub filters: Vec<(String, Vec<String>)>,
    pub fields: Vec<String>,
    pub sort: Vec<(String, bool)>,
    pub limit: Option<usize>,
    pub marker: Option<String>,
    pub page_reverse: bool,
    /// `tags` (all of) and `tags-any`, `not-tags`, `not-tags-any`.
    pub tags_all: Vec<String>,
    pub tags_any: Vec<String>,
    pub not_tags_all: Vec<String>,
    pub not_tags_any: Vec<String>,
}

impl ListQuery {
    pub fn parse(raw: Option<&str>) -> Result<ListQuery, Fault> {
        let mut q = ListQuery::default();
        let mut sort_keys = Vec::new();
        let mut sort_dirs = Vec::new();
        for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            let v = v.into_owned();
            let split = |v: &str| -> Vec<String> {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            };
            match &*k {
                "fields" => q.fields.extend(split(&v)),
                "limit" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| Fault::invalid("limit", &v, "Expected an integer"))?;
                    if n < 1 {
                        return Err(Fault::invalid("limit", n, "Value should be positive"));
                    }
                    q.limit = Some((n as usize).min(MAX_PAGE_SIZE));
                }
                "marker" => q.marker = Some(v),
                "page_reverse" => {
                    q.page_reverse = matches!(v.to_ascii_lowercase().as_str(), "true" | "1")
                }
                "sort" => {
                    for item in split(&v) {
                        let (key, dir) = item.split_once(':').unwrap_or((&item, "asc"));
                        q.sort.push((key.to_owned(), direction(dir)?));
                    }
                }
                "sort_key" => sort_keys.extend(split(&v)),
                "sort_dir" => sort_dirs.extend(split(&v)),
                "tags" => q.tags_all.extend(split(&v)),
                "tags-any" => q.tags_any.extend(split(&v)),
                "not-tags" => q.not_tags_all.extend(split(&v)),
                "not-tags-any" => q.not_tags_any.extend(split(&v)),
                // Ignored by Octavia too: project scoping has no meaning
                // with one admin token.
                "project_id" | "tenant_id" => {}
                key => match q.filters.iter_mut().find(|(k, _)| k == key) {
                    Some((_, values)) => values.push(v),
                    None => q.filters.push((key.to_owned(), vec![v])),
                },
            }
        }
        for (i, key) in sort_keys.into_iter().enumerate() {
            let dir = sort_dirs
                .get(i)
                .or(sort_dirs.first())
                .map_or("asc", String::as_str);
            q.sort.push((key, direction(dir)?));
        }
        Ok(q)
    }
}

/// `asc` → true.
fn direction(dir: &str) -> Result<bool, Fault> {
    match dir.to_ascii_lowercase().as_str() {
        "asc" => Ok(true),
        "desc" => Ok(false),
        other => Err(Fault::invalid(
            "sort_dir",
            other,
            "Value should be one of: asc, desc",
        )),
    }
}

/// The string a query value is compared with.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(if *b { "True" } else { "False" }.to_owned()),
        Value::Number(n) => Some(n.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

fn matches(item: &Value, key: &str, wanted: &[String]) -> Result<bool, Fault> {
    // Objects show their parents as lists (`loadbalancers: [{id}]`) but
    // are filtered by the parent's id; openstacksdk also spells the load
    // balancer's `load_balancer_id` (Octavia's column name).
    let v = item.get(key).or_else(|| match key {
        "loadbalancer_id" | "load_balancer_id" => item
            .get("loadbalancer_id")
            .or_else(|| item.get("loadbalancers")),
        "listener_id" => item.get("listeners"),
        "pool_id" => item.get("pools"),
        _ => None,
    });
    let Some(v) = v else {
        return Err(Fault::bad_request(format!(
            "Invalid filter argument: {key} is not an attribute of this object."
        )));
    };
    // Related objects, e.g. `loadbalancers: [{"id": ...}]`, filter by id.
    if let Value::Array(items) = v {
        return Ok(items.iter().any(|i| {
            let id = i.get("id").and_then(Value::as_str).or(i.as_str());
            id.is_some_and(|id| wanted.iter().any(|w| w == id))
        }));
    }
    let Some(have) = text(v) else {
        return Ok(false);
    };
    Ok(wanted
        .iter()
        .any(|w| *w == have || (matches!(v, Value::Bool(_)) && w.eq_ignore_ascii_case(&have))))
}

fn tags(item: &Value) -> Vec<&str> {
    item.get("tags")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn compare(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Null, _) => Ordering::Less,
        (_, Value::Null) => Ordering::Greater,
        _ => text(a).cmp(&text(b)),
    }
}

/// Filters, sorts, pages and projects `items` (API views), answering
/// `{"<plural>": [...], "<plural>_links": [...]}`. `path` is the request
/// path the links repeat.
pub fn list(
    mut items: Vec<Value>,
    q: &ListQuery,
    plural: &str,
    path: &str,
) -> Result<Value, Fault> {
    // Filters.
    let mut kept = Vec::with_capacity(items.len());
    'items: for item in items.drain(..) {
        for (key, wanted) in &q.filters {
            if !matches(&item, key, wanted)? {
                continue 'items;
            }
        }
        let t = tags(&item);
        if !q.tags_all.iter().all(|w| t.contains(&w.as_str()))
            || (!q.tags_any.is_empty() && !q.tags_any.iter().any(|w| t.contains(&w.as_str())))
            || (!q.not_tags_all.is_empty()
                && q.not_tags_all.iter().all(|w| t.contains(&w.as_str())))
            || q.not_tags_any.iter().any(|w| t.contains(&w.as_str()))
        {
            continue;
        }
        kept.push(item);
    }
    let mut items = kept;

    // Sort: the keys asked for, then Octavia's default (created_at, id).
    let mut keys = q.sort.clone();
    if let Some(first) = items.first() {
        for (k, _) in &keys {
            if first.get(k).is_none() {
                return Err(Fault::bad_request(format!(
                    "Invalid sort key: {k} is not an attribute of this object."
                )));
            }
        }
        for default in ["created_at", "id"] {
            if first.get(default).is_some() && !keys.iter().any(|(k, _)| k == default) {
                keys.push((default.to_owned(), true));
            }
        }
    }
    items.sort_by(|a, b| {
        for (k, asc) in &keys {
            let o = compare(&a[k.as_str()], &b[k.as_str()]);
            let o = if *asc { o } else { o.reverse() };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    });

    // Page: `marker` is the id of the last item of the previous page
    // (the first of the next one when paging in reverse).
    let id_of = |v: &Value| v["id"].as_str().unwrap_or_default().to_owned();
    let limit = q.limit.unwrap_or(MAX_PAGE_SIZE);
    let (page, more_after, more_before): (Vec<Value>, bool, bool) = match &q.marker {
        None => {
            let more = items.len() > limit;
            (items.into_iter().take(limit).collect(), more, false)
        }
        Some(marker) => {
            let Some(pos) = items.iter().position(|i| id_of(i) == *marker) else {
                return Err(Fault::not_found("Marker", marker));
            };
            if q.page_reverse {
                let start = pos.saturating_sub(limit);
                let page: Vec<Value> = items[start..pos].to_vec();
                (page, true, start > 0)
            } else {
                let rest = &items[pos + 1..];
                let more = rest.len() > limit;
                (rest.iter().take(limit).cloned().collect(), more, true)
            }
        }
    };

    let links = links(q, limit, path, &page, more_after, more_before);
    let page: Vec<Value> = page.into_iter().map(|i| project(i, &q.fields)).collect();
    let mut out = Map::new();
    out.insert(plural.to_owned(), Value::Array(page));
    out.insert(format!("{plural}_links"), Value::Array(links));
    Ok(Value::Object(out))
}

/// `next` (when more follow the page) and `previous` (when the page
/// came after a marker and others precede it) links, as Octavia makes
/// them: on every list, the default page size included, so a client that
/// asked for no `limit` still pages through everything; each repeats the
/// page size, the sort, the filters and `fields`, at the URL the list was
/// asked at.
fn links(
    q: &ListQuery,
    limit: usize,
    path: &str,
    page: &[Value],
    more_after: bool,
    more_before: bool,
) -> Vec<Value> {
    let id_of = |v: &Value| v["id"].as_str().unwrap_or_default().to_owned();
    let link = |rel: &str, marker: &str, reverse: bool| {
        let mut qs = url::form_urlencoded::Serializer::new(String::new());
        qs.append_pair("limit", &limit.to_string());
        for (k, dir) in &q.sort {
            qs.append_pair(
                "sort",
                &format!("{k}:{}", if *dir { "asc" } else { "desc" }),
            );
        }
        for (k, vs) in &q.filters {
            for v in vs {
                qs.append_pair(k, v);
            }
        }
        for (k, vs) in [
            ("tags", &q.tags_all),
            ("tags-any", &q.tags_any),
            ("not-tags", &q.not_tags_all),
            ("not-tags-any", &q.not_tags_any),
        ] {
            if !vs.is_empty() {
                qs.append_pair(k, &vs.join(","));
            }
        }
        if !q.fields.is_empty() {
            qs.append_pair("fields", &q.fields.join(","));
        }
        qs.append_pair("marker", marker);
        if reverse {
            qs.append_pair("page_reverse", "True");
        }
        json!({ "rel": rel, "href": format!("{path}?{}", qs.finish()) })
    };
    let mut links = Vec::new();
    if let (Some(first), Some(last)) = (page.first(), page.last()) {
        if more_after {
            links.push(link("next", &id_of(last), false));
        }
        if more_before {
            links.push(link("previous", &id_of(first), true));
        }
    }
    links
}

/// Keeps only `fields` (all when empty).
pub fn project(item: Value, fields: &[String]) -> Value {
    if fields.is_empty() {
        return item;
    }
    match item {
        Value::Object(mut m) => {
            let mut out = Map::new();
            for f in fields {
                if let Some(v) = m.remove(f) {
                    out.insert(f.clone(), v);
                }
            }
            Value::Object(out)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items() -> Vec<Value> {
        (0..5)
            .map(|i| {
                json!({
                    "id": format!("id{i}"),
                    "name": if i % 2 == 0 { "even" } else { "odd" },
                    "weight": 10 - i,
                    "admin_state_up": i != 3,
                    "created_at": format!("2026-01-01T00:00:0{i}"),
                    "tags": if i == 1 { vec!["a", "b"] } else { vec!["a"] },
                    "loadbalancers": [{"id": format!("lb{}", i % 2)}],
                })
            })
            .collect()
    }

    fn ids(v: &Value, plural: &str) -> Vec<String> {
        v[plural]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| i["id"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn run(qs: &str) -> Result<Value, Fault> {
        list(
            items(),
            &ListQuery::parse(Some(qs))?,
            "things",
            "/v2/things",
        )
    }

    #[test]
    fn filters_sort_and_fields() -> Result<(), Fault> {
        assert_eq!(ids(&run("name=odd")?, "things"), ["id1", "id3"]);
        assert_eq!(ids(&run("name=odd&name=even&id=id4")?, "things"), ["id4"]);
        assert_eq!(ids(&run("admin_state_up=false")?, "things"), ["id3"]);
        assert_eq!(
            ids(&run("loadbalancer_id=x&loadbalancers=lb1")?, "things").len(),
            0
        );
        assert_eq!(ids(&run("loadbalancers=lb1")?, "things"), ["id1", "id3"]);
        assert_eq!(ids(&run("load_balancer_id=lb1")?, "things"), ["id1", "id3"]);
        assert_eq!(
            ids(&run("sort=weight:asc")?, "things"),
            ["id4", "id3", "id2", "id1", "id0"]
        );
        assert_eq!(
            ids(&run("sort_key=name&sort_dir=desc")?, "things"),
            ["id1", "id3", "id0", "id2", "id4"]
        );
        assert_eq!(ids(&run("tags=b")?, "things"), ["id1"]);
        assert_eq!(ids(&run("not-tags-any=b")?, "things").len(), 4);
        let v = run("fields=id&fields=name")?;
        assert_eq!(v["things"][0], json!({"id": "id0", "name": "even"}));
        assert_eq!(run("nope=1").err().map(|f| f.status.as_u16()), Some(400));
        assert_eq!(run("sort=nope").err().map(|f| f.status.as_u16()), Some(400));
        Ok(())
    }

    #[test]
    fn pages_link_forward_and_back() -> Result<(), Fault> {
        let p1 = run("limit=2")?;
        assert_eq!(ids(&p1, "things"), ["id0", "id1"]);
        let next = p1["things_links"][0]["href"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            next.starts_with("/v2/things?") && next.contains("marker=id1"),
            "{next}"
        );
        let p2 = run(next.split_once('?').map_or("", |s| s.1))?;
        assert_eq!(ids(&p2, "things"), ["id2", "id3"]);
        let rels: Vec<&str> = p2["things_links"]
            .as_array()
            .map(|a| a.iter().filter_map(|l| l["rel"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(rels, ["next", "previous"]);
        let prev = p2["things_links"][1]["href"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(
            ids(&run(prev.split_once('?').map_or("", |s| s.1))?, "things"),
            ["id0", "id1"]
        );
        let p3 = run("limit=2&marker=id3")?;
        assert_eq!(ids(&p3, "things"), ["id4"]);
        assert_eq!(p3["things_links"].as_array().map(Vec::len), Some(1));
        assert_eq!(run("marker=zz").err().map(|f| f.status.as_u16()), Some(404));
        Ok(())
    }

    #[test]
    fn a_list_longer_than_the_default_page_links_to_the_rest() -> Result<(), Fault> {
        let many: Vec<Value> = (0..1200)
            .map(|i| json!({"id": format!("m{i:04}"), "created_at": "2026-01-01T00:00:00", "tags": ["t"]}))
            .collect();
        let q = ListQuery::parse(Some("tags=t&fields=id"))?;
        let p1 = list(
            many.clone(),
            &q,
            "members",
            "http://h/v2.0/lbaas/pools/p/members",
        )?;
        assert_eq!(ids(&p1, "members").len(), MAX_PAGE_SIZE);
        let links = p1["members_links"].as_array().cloned().unwrap_or_default();
        assert_eq!(links.len(), 1, "{links:?}");
        let next = links[0]["href"].as_str().unwrap_or_default();
        assert!(
            next.starts_with("http://h/v2.0/lbaas/pools/p/members?limit=1000&")
                && next.contains("marker=m0999")
                && next.contains("tags=t")
                && next.contains("fields=id"),
            "{next}"
        );
        let q2 = ListQuery::parse(next.split_once('?').map(|s| s.1))?;
        let p2 = list(many, &q2, "members", "http://h/v2.0/lbaas/pools/p/members")?;
        assert_eq!(ids(&p2, "members").len(), 200);
        assert_eq!(ids(&p2, "members")[0], "m1000");
        let rels: Vec<&str> = p2["members_links"]
            .as_array()
            .map(|a| a.iter().filter_map(|l| l["rel"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(rels, ["previous"]);
        Ok(())
    }
}
