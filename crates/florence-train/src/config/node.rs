//! A config file's parsed tree, in file order, the same for YAML and JSON.
//!
//! Mappings keep their keys in the order written (the data sources are read in config order,
//! `dataset_config`'s task prompts included), and a key written twice is refused rather than
//! silently overwritten.

use std::fmt;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

/// One value of a config file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    /// An empty value (`key:` in YAML, `null` in JSON).
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A whole number that fits an i64.
    Int(i64),
    /// A whole number above i64's range.
    UInt(u64),
    /// A number with a fraction or an exponent.
    Float(f64),
    /// Text.
    Str(String),
    /// A list.
    Seq(Vec<Node>),
    /// A mapping, in file order.
    Map(Vec<(String, Node)>),
}

impl Node {
    /// The value as the user wrote it, for error messages (`"two"`, `[1, 2]`).
    pub(crate) fn describe(&self) -> String {
        match self {
            Node::Null => "an empty value".into(),
            Node::Bool(b) => b.to_string(),
            Node::Int(i) => i.to_string(),
            Node::UInt(u) => u.to_string(),
            Node::Float(f) => format!("{f:?}"),
            Node::Str(s) => format!("{s:?}"),
            Node::Seq(_) => "a list".into(),
            Node::Map(_) => "a mapping".into(),
        }
    }

    /// The number, if this is one.
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match *self {
            Node::Int(i) => Some(i as f64),
            Node::UInt(u) => Some(u as f64),
            Node::Float(f) => Some(f),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a config value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(i64::try_from(v).map_or(Node::UInt(v), Node::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries: Vec<(String, Node)> = Vec::new();
        while let Some((key, value)) = map.next_entry::<Node, Node>()? {
            let key = match key {
                Node::Str(s) => s,
                Node::Int(_) | Node::UInt(_) | Node::Float(_) | Node::Bool(_) => key.describe(),
                other => {
                    return Err(A::Error::custom(format!(
                        "a key must be text, not {}",
                        other.describe()
                    )))
                }
            };
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(A::Error::custom(format!("key {key:?} is given twice")));
            }
            entries.push((key, value));
        }
        Ok(Node::Map(entries))
    }
}
