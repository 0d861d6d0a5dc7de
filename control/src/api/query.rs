//! List queries as Octavia takes them: filters on any attribute, `fields`,
//! `sort` (or `sort_key`/`sort_dir`), and `limit`/`marker`/`page_reverse`
//! pagination with `<plural>_links`.

use std::cmp::Ordering;

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Map, Value};

use super::fault::Fault;
use crate::model::{By, Row, Table};

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

/// Whether a view passes the query's filters and tags.
fn wanted(item: &Value, q: &ListQuery) -> Result<bool, Fault> {
    for (key, wanted) in &q.filters {
        if !matches(item, key, wanted)? {
            return Ok(false);
        }
    }
    let t = tags(item);
    Ok(q.tags_all.iter().all(|w| t.contains(&w.as_str()))
        && (q.tags_any.is_empty() || q.tags_any.iter().any(|w| t.contains(&w.as_str())))
        && (q.not_tags_all.is_empty() || !q.not_tags_all.iter().all(|w| t.contains(&w.as_str())))
        && !q.not_tags_any.iter().any(|w| t.contains(&w.as_str())))
}

impl ListQuery {
    /// Whether anything filters the list (attributes or tags).
    fn filtering(&self) -> bool {
        !self.filters.is_empty()
            || !self.tags_all.is_empty()
            || !self.tags_any.is_empty()
            || !self.not_tags_all.is_empty()
            || !self.not_tags_any.is_empty()
    }

    /// The one value wanted for `key`, when exactly one non-empty value is.
    fn only(&self, key: &str) -> Option<&str> {
        match self.filters.iter().find(|(k, _)| k == key) {
            Some((_, v)) if v.len() == 1 && !v[0].is_empty() => Some(&v[0]),
            _ => None,
        }
    }
}

/// A page: its items, and whether more follow it and precede it.
type Page = (Vec<Value>, bool, bool);

/// Filters, sorts and pages `items`: the general way, for any sort.
/// `marker` is the view of the object the page starts after (before, with
/// `page_reverse`), which need not pass the filters itself.
fn page_sorted(
    items: Vec<Value>,
    marker: Option<&Value>,
    q: &ListQuery,
    limit: usize,
) -> Result<Page, Fault> {
    let mut kept = Vec::with_capacity(items.len());
    for item in items {
        if wanted(&item, q)? {
            kept.push(item);
        }
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
    let order = |a: &Value, b: &Value| {
        for (k, asc) in &keys {
            let o = compare(&a[k.as_str()], &b[k.as_str()]);
            let o = if *asc { o } else { o.reverse() };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    };
    items.sort_by(order);

    // Page: `marker` is the last item of the previous page (the first of
    // the next one when paging in reverse).
    Ok(match marker {
        None => {
            let more = items.len() > limit;
            items.truncate(limit);
            (items, more, false)
        }
        Some(m) if q.page_reverse => {
            let end = items.partition_point(|i| order(i, m) == Ordering::Less);
            let start = end.saturating_sub(limit);
            items.truncate(end);
            (items.split_off(start), true, start > 0)
        }
        Some(m) => {
            let from = items.partition_point(|i| order(i, m) != Ordering::Greater);
            let mut rest = items.split_off(from);
            let more = rest.len() > limit;
            rest.truncate(limit);
            (rest, more, true)
        }
    })
}

/// A page as the API answers it: `{"<plural>": [...], "<plural>_links":
/// [...]}`, written straight from the typed views when nothing needs a
/// JSON tree of them.
#[derive(Debug)]
pub struct Listing<V> {
    plural: String,
    items: Vec<Item<V>>,
    links: Vec<Value>,
}

/// An object of a page: its typed view, or the tree `fields` or a
/// filter made of it.
#[derive(Debug)]
enum Item<V> {
    View(V),
    Tree(Value),
}

impl<V: Serialize> Serialize for Item<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Item::View(v) => v.serialize(s),
            Item::Tree(t) => t.serialize(s),
        }
    }
}

impl<V: Serialize> Serialize for Listing<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry(&self.plural, &self.items)?;
        m.serialize_entry(&format!("{}_links", self.plural), &self.links)?;
        m.end()
    }
}

impl<V: Serialize> Listing<V> {
    /// The answer's JSON.
    pub fn json(&self) -> Result<Vec<u8>, Fault> {
        // Sized for the page up front (objects run to about 1 KB), not
        // grown by doubling and copying.
        let mut out = Vec::with_capacity(256 + self.items.len() * 1024);
        serde_json::to_writer(&mut out, self)
            .map_err(|e| Fault::internal(format!("list not written: {e}")))?;
        Ok(out)
    }

    /// The answer as a JSON tree.
    pub fn value(&self) -> Value {
        crate::api::view::value(self)
    }
}

/// The listing of a page of trees.
fn answer<V>(page: Page, q: &ListQuery, limit: usize, plural: &str, path: &str) -> Listing<V> {
    let (page, more_after, more_before) = page;
    let id_of = |v: &Value| v["id"].as_str().unwrap_or_default().to_owned();
    let links = links(
        q,
        limit,
        path,
        page.first().map(id_of).as_deref(),
        page.last().map(id_of).as_deref(),
        more_after,
        more_before,
    );
    Listing {
        plural: plural.to_owned(),
        items: page
            .into_iter()
            .map(|i| Item::Tree(project(i, &q.fields)))
            .collect(),
        links,
    }
}

/// Filters, sorts, pages and projects `items` (API views of objects held
/// outside the store, such as the configured subnets), answering
/// `{"<plural>": [...], "<plural>_links": [...]}`. `path` is the URL the
/// links repeat.
pub fn list(
    items: Vec<Value>,
    q: &ListQuery,
    plural: &str,
    path: &str,
) -> Result<Listing<Value>, Fault> {
    let marker = match &q.marker {
        Some(m) => Some(
            items
                .iter()
                .find(|i| i["id"].as_str() == Some(m.as_str()))
                .cloned()
                .ok_or_else(|| Fault::not_found("Marker", m))?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(MAX_PAGE_SIZE);
    let page = page_sorted(items, marker.as_ref(), q, limit)?;
    Ok(answer(page, q, limit, plural, path))
}

/// An order a [`Table`] keeps, so a page is walked to, not sorted out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// (created_at, id): Octavia's default.
    Created,
    Id,
}

/// The kept order (and whether ascending) the query's sort amounts to.
fn kept_order(sort: &[(String, bool)]) -> Option<(Order, bool)> {
    match sort {
        [] => Some((Order::Created, true)),
        // id is unique: whatever follows it does not matter.
        [(k, asc), ..] if k == "id" => Some((Order::Id, *asc)),
        // created_at ascending is followed by the default id ascending.
        [(k, true)] if k == "created_at" => Some((Order::Created, true)),
        [(k1, a1), (k2, a2), ..] if k1 == "created_at" && k2 == "id" && a1 == a2 => {
            Some((Order::Created, *a1))
        }
        _ => None,
    }
}

fn order_key<T: Row>(order: Order, t: &T) -> (&str, &str) {
    match order {
        Order::Created => (t.created_at(), t.id()),
        Order::Id => ("", t.id()),
    }
}

/// The objects a list is drawn from: a whole table, or the few that an
/// index (or a parent: the members of one pool) names.
#[derive(Debug)]
pub struct Rows<'a, T> {
    table: &'a Table<T>,
    only: Option<Vec<&'a T>>,
}

impl<'a, T: Row> Rows<'a, T> {
    /// The table, narrowed through an index when the query wants one
    /// value of `id`, `name` or a key of `indexed` (the filters are still
    /// applied to what the index gives).
    pub fn of(table: &'a Table<T>, q: &ListQuery, indexed: &[(&str, By)]) -> Rows<'a, T> {
        let only = if let Some(id) = q.only("id") {
            Some(table.get(id).into_iter().collect())
        } else if let Some(name) = q.only("name").filter(|_| T::NAMED) {
            Some(table.with(By::Name, name).collect())
        } else {
            indexed
                .iter()
                .find_map(|(key, by)| q.only(key).map(|v| table.with(*by, v).collect()))
        };
        Rows { table, only }
    }

    /// Only `items` of the table (the members of one pool).
    pub fn only(table: &'a Table<T>, items: Vec<&'a T>) -> Rows<'a, T> {
        Rows {
            table,
            only: Some(items),
        }
    }

    fn all(&self) -> Box<dyn Iterator<Item = &'a T> + '_> {
        match &self.only {
            Some(v) => Box::new(v.iter().copied()),
            None => Box::new(self.table.values()),
        }
    }

    /// The objects strictly after `marker` (all, without one) in `order`
    /// when `up`; else strictly before it, walking down.
    fn walk(
        self,
        order: Order,
        marker: Option<&'a T>,
        up: bool,
    ) -> Box<dyn Iterator<Item = &'a T> + 'a> {
        let table = self.table;
        if let Some(mut v) = self.only {
            v.sort_by(|a, b| order_key(order, *a).cmp(&order_key(order, *b)));
            let at = marker.map(|m| order_key(order, m));
            return if up {
                let from = at.map_or(0, |k| v.partition_point(|t| order_key(order, *t) <= k));
                Box::new(v.into_iter().skip(from))
            } else {
                let to = at.map_or(v.len(), |k| v.partition_point(|t| order_key(order, *t) < k));
                v.truncate(to);
                Box::new(v.into_iter().rev())
            };
        }
        match order {
            Order::Created => {
                let set = table.by_created();
                let get = move |(_, id): &'a (String, String)| table.get(id);
                match (
                    marker.map(|m| (m.created_at().to_owned(), m.id().to_owned())),
                    up,
                ) {
                    (None, true) => Box::new(set.iter().filter_map(get)),
                    (None, false) => Box::new(set.iter().rev().filter_map(get)),
                    (Some(k), true) => {
                        Box::new(set.range((Excluded(k), Unbounded)).filter_map(get))
                    }
                    (Some(k), false) => {
                        Box::new(set.range((Unbounded, Excluded(k))).rev().filter_map(get))
                    }
                }
            }
            Order::Id => {
                let rows: &'a BTreeMap<String, T> = table;
                match (marker.map(Row::id), up) {
                    (None, true) => Box::new(rows.values()),
                    (None, false) => Box::new(rows.values().rev()),
                    (Some(m), true) => Box::new(
                        rows.range::<str, _>((Excluded(m), Unbounded))
                            .map(|(_, v)| v),
                    ),
                    (Some(m), false) => Box::new(
                        rows.range::<str, _>((Unbounded, Excluded(m)))
                            .rev()
                            .map(|(_, v)| v),
                    ),
                }
            }
        }
    }
}

/// Lists objects of the store: filters, sorts, pages and projects as
/// [`list`] does, at a cost in proportion to the page. In the orders a
/// table keeps (Octavia's default, created_at then id, or id), the table
/// is walked from the marker and the walk stops once the page is full;
/// only the objects filtered and the page get a view built. Any other
/// sort builds and sorts the views of every candidate.
pub fn list_rows<'a, T: Row, V: Serialize>(
    rows: Rows<'a, T>,
    view: impl Fn(&'a T) -> V,
    q: &ListQuery,
    plural: &str,
    path: &str,
) -> Result<Listing<V>, Fault> {
    let tree = |t: &'a T| crate::api::view::value(&view(t));
    let marker = match &q.marker {
        Some(m) => Some(
            rows.table
                .get(m.as_str())
                .ok_or_else(|| Fault::not_found("Marker", m))?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(MAX_PAGE_SIZE);
    let Some((order, asc)) = kept_order(&q.sort) else {
        let items = rows.all().map(tree).collect();
        let page = page_sorted(items, marker.map(tree).as_ref(), q, limit)?;
        return Ok(answer(page, q, limit, plural, path));
    };
    let filtering = q.filtering();
    if filtering {
        // A filter on what the object does not have is refused, whether
        // or not anything is left to filter.
        if let Some(probe) = rows.table.values().next() {
            let v = tree(probe);
            for (key, wanted) in &q.filters {
                matches(&v, key, wanted)?;
            }
        }
    }
    let reverse = q.page_reverse && marker.is_some();
    let mut page: Vec<(&'a T, Item<V>)> = Vec::new();
    let mut more = false;
    for t in rows.walk(order, marker, asc != reverse) {
        let filtered = if filtering {
            let v = tree(t);
            if !wanted(&v, q)? {
                continue;
            }
            Some(v)
        } else {
            None
        };
        if page.len() == limit {
            more = true;
            break;
        }
        let item = match filtered {
            Some(v) => Item::Tree(project(v, &q.fields)),
            None if !q.fields.is_empty() => Item::Tree(project(tree(t), &q.fields)),
            None => Item::View(view(t)),
        };
        page.push((t, item));
    }
    let (more_after, more_before) = if reverse {
        page.reverse();
        (true, more)
    } else {
        (more, marker.is_some())
    };
    let links = links(
        q,
        limit,
        path,
        page.first().map(|(t, _)| t.id()),
        page.last().map(|(t, _)| t.id()),
        more_after,
        more_before,
    );
    Ok(Listing {
        plural: plural.to_owned(),
        items: page.into_iter().map(|(_, i)| i).collect(),
        links,
    })
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
    first: Option<&str>,
    last: Option<&str>,
    more_after: bool,
    more_before: bool,
) -> Vec<Value> {
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
    if let (Some(first), Some(last)) = (first, last) {
        if more_after {
            links.push(link("next", last, false));
        }
        if more_before {
            links.push(link("previous", first, true));
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
        .map(|l| l.value())
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

    /// Members with creation times that tie and ids that do not follow
    /// creation order.
    fn table(n: usize) -> crate::model::Table<crate::model::Member> {
        let mut t = crate::model::Table::default();
        for i in 0..n {
            t.insert(crate::model::Member {
                common: crate::model::Common {
                    id: format!("m{:03}", (i * 37) % 101),
                    name: if i % 2 == 0 { "even" } else { "odd" }.into(),
                    description: String::new(),
                    project_id: String::new(),
                    admin_state_up: true,
                    provisioning_status: crate::model::ProvisioningStatus::Active,
                    operating_status: crate::model::OperatingStatus::NoMonitor,
                    tags: if i % 3 == 0 { vec!["b".into()] } else { vec![] },
                    created_at: format!("2026-01-01T00:00:{:02}", i / 3),
                    updated_at: None,
                    provisioning_error: None,
                    deployed: true,
                    next_attempt_at: None,
                },
                load_balancer_id: "lb".into(),
                pool_id: "p".into(),
                address: format!("10.0.0.{i}"),
                protocol_port: 80,
                weight: (i % 5) as i64,
                backup: false,
                subnet_id: None,
                monitor_address: None,
                monitor_port: None,
            });
        }
        t
    }

    #[test]
    fn walking_the_indexes_pages_as_sorting_every_view_does() -> Result<(), Fault> {
        let t = table(40);
        let views: Vec<Value> = t
            .values()
            .map(|m| crate::api::view::value(&crate::api::view::member(m)))
            .collect();
        let id = |i: usize| format!("m{:03}", (i * 37) % 101);
        let (odd, some) = (id(7), id(20));
        let queries = [
            String::new(),
            "limit=3".into(),
            format!("limit=3&marker={some}"),
            format!("limit=3&marker={some}&page_reverse=True"),
            format!("limit=30&marker={some}&page_reverse=True"),
            "sort=id:desc&limit=4".into(),
            format!("sort=id:desc&limit=4&marker={some}"),
            format!("sort=id&limit=4&marker={some}&page_reverse=True"),
            format!("sort=created_at:desc,id:desc&limit=5&marker={some}"),
            format!("sort_key=created_at&limit=5&marker={some}&page_reverse=1"),
            format!("sort=weight:asc&limit=4&marker={some}"),
            format!("sort=created_at:desc&limit=4&marker={some}"),
            "name=odd&limit=2".into(),
            format!("name=odd&limit=2&marker={odd}"),
            format!("name=odd&limit=2&marker={odd}&page_reverse=True"),
            "tags=b&limit=2".into(),
            "not-tags=b&weight=3".into(),
            "fields=id,name&limit=2".into(),
            format!("id={odd}"),
            format!("id={odd}&name=even"),
            "limit=1000&marker=m000".into(),
        ];
        for qs in &queries {
            let q = ListQuery::parse(Some(qs))?;
            let sorted = list(views.clone(), &q, "members", "/m")?.value();
            let walked = list_rows(
                Rows::of(&t, &q, &[]),
                crate::api::view::member,
                &q,
                "members",
                "/m",
            )?
            .value();
            assert_eq!(walked, sorted, "{qs}");
            let scoped = list_rows(
                Rows::only(&t, t.values().collect()),
                crate::api::view::member,
                &q,
                "members",
                "/m",
            )?
            .value();
            assert_eq!(scoped, sorted, "{qs} (scoped)");
        }
        // A filter on what a member does not have is refused either way.
        let q = ListQuery::parse(Some("colour=red"))?;
        let rows = Rows::of(&t, &q, &[]);
        assert!(list_rows(rows, crate::api::view::member, &q, "m", "/m").is_err());
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
        )?
        .value();
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
        let p2 = list(many, &q2, "members", "http://h/v2.0/lbaas/pools/p/members")?.value();
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
