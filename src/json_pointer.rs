//! JSON pointers (RFC 6901), as a feed's mapping names where its events and their fields are:
//! `/events`, `/meta/id`, `/items/0`, or `""` for the whole value. They are followed through the
//! page's text without parsing what they do not lead to, so a payload reached by one is its
//! original text, numbers and all.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// A parsed JSON pointer: its reference tokens, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPointer {
    tokens: Vec<String>,
    /// As written, for messages.
    text: String,
}

impl JsonPointer {
    pub fn parse(text: &str) -> Result<JsonPointer, String> {
        if text.is_empty() {
            return Ok(JsonPointer {
                tokens: Vec::new(),
                text: String::new(),
            });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "{text:?} is not a JSON pointer: it starts with \"/\" (like \"/{text}\"), or is \"\" for the whole value"
            ));
        };
        let mut tokens = Vec::new();
        for token in rest.split('/') {
            let mut unescaped = String::with_capacity(token.len());
            let mut chars = token.chars();
            while let Some(c) = chars.next() {
                if c != '~' {
                    unescaped.push(c);
                    continue;
                }
                match chars.next() {
                    Some('0') => unescaped.push('~'),
                    Some('1') => unescaped.push('/'),
                    _ => {
                        return Err(format!(
                            "{text:?} is not a JSON pointer: \"~\" is written \"~0\" and \"/\" inside a name \"~1\""
                        ))
                    }
                }
            }
            tokens.push(unescaped);
        }
        Ok(JsonPointer {
            tokens,
            text: text.to_string(),
        })
    }

    /// The pointer to a member of the whole value, `/member`.
    pub fn member(member: &str) -> JsonPointer {
        JsonPointer {
            tokens: vec![member.to_string()],
            text: format!("/{}", member.replace('~', "~0").replace('/', "~1")),
        }
    }

    /// Whether it points at the whole value.
    pub fn is_whole(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The value it points at in `value`; None if there is none (a missing member, an index
    /// past the end, or a scalar on the way). An error only if the text is not JSON.
    pub fn find<'a>(&self, value: &'a RawValue) -> Result<Option<&'a RawValue>, serde_json::Error> {
        descend(value, &self.tokens)
    }

    /// As `find`, in a value whose members are parsed already.
    pub fn find_parsed<'a>(
        &self,
        value: &Parsed<'a>,
    ) -> Result<Option<&'a RawValue>, serde_json::Error> {
        let (Some((first, rest)), Some(members)) = (self.tokens.split_first(), &value.members)
        else {
            return self.find(value.whole);
        };
        match members.get(first) {
            Some(at) => descend(at, rest),
            None => Ok(None),
        }
    }

    /// As `find`, in a document's bytes.
    pub fn find_in<'a>(&self, bytes: &'a [u8]) -> Result<Option<&'a RawValue>, serde_json::Error> {
        let whole: &RawValue = serde_json::from_slice(bytes)?;
        self.find(whole)
    }
}

/// A JSON value with its members parsed, if it is an object: several pointers into it then
/// cost one parse of it, not one each.
pub struct Parsed<'a> {
    whole: &'a RawValue,
    members: Option<Members<'a>>,
}

impl<'a> Parsed<'a> {
    pub fn new(whole: &'a RawValue) -> Result<Parsed<'a>, serde_json::Error> {
        let members = match whole.get().trim_start().starts_with('{') {
            true => Some(serde_json::from_str(whole.get())?),
            false => None,
        };
        Ok(Parsed { whole, members })
    }
}

impl<'de> Deserialize<'de> for Parsed<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let whole = <&RawValue>::deserialize(deserializer)?;
        Parsed::new(whole).map_err(serde::de::Error::custom)
    }
}

/// An object's members in order, their names borrowed from the text unless escaped: a few
/// names are found faster by a look along them than by hashing, and none is allocated.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Members<'a> {
    /// The member named `name`; the last of that name, as JSON parsers take it.
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(member, _)| member == name)
            .map(|(_, value)| *value)
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;

        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = Members<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Name(name)) = map.next_key()? {
                    members.push((name, map.next_value()?));
                }
                Ok(Members(members))
            }
        }

        deserializer.deserialize_map(Object)
    }
}

/// A member's name, borrowed from the text when it has no escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;

        impl<'de> serde::de::Visitor<'de> for Text {
            type Value = Name<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a member's name")
            }
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(text)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(text.to_string())))
            }
            fn visit_string<E>(self, text: String) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(text)))
            }
        }

        deserializer.deserialize_str(Text)
    }
}

/// The value `tokens` lead to from `value`, one member or element at a time.
fn descend<'a>(
    value: &'a RawValue,
    tokens: &[String],
) -> Result<Option<&'a RawValue>, serde_json::Error> {
    let mut at = value;
    for token in tokens {
        let Some(next) = child(at, token)? else {
            return Ok(None);
        };
        at = next;
    }
    Ok(Some(at))
}

/// The member `token` of an object, or the element it numbers of an array.
fn child<'a>(value: &'a RawValue, token: &str) -> Result<Option<&'a RawValue>, serde_json::Error> {
    match value.get().trim_start().as_bytes().first() {
        Some(b'{') => {
            let members: Members<'a> = serde_json::from_str(value.get())?;
            Ok(members.get(token))
        }
        Some(b'[') => {
            // RFC 6901: an index is digits without a leading zero.
            let index = match token.parse::<usize>() {
                Ok(index) if token == index.to_string() => index,
                _ => return Ok(None),
            };
            let elements: Vec<&'a RawValue> = serde_json::from_str(value.get())?;
            Ok(elements.get(index).copied())
        }
        _ => Ok(None),
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl<'de> Deserialize<'de> for JsonPointer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        JsonPointer::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(pointer: &str, json: &str) -> Option<String> {
        let pointer = JsonPointer::parse(pointer).unwrap_or_else(|e| panic!("{e}"));
        pointer
            .find_in(json.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|raw| raw.get().to_string())
    }

    #[test]
    fn follows_members_and_indexes_keeping_the_text_as_written() {
        let doc =
            r#"{"a": {"b/c": [10, {"~x": 1.50000000000000000001}]}, "": 5, "\u0065": 6, "e": 7}"#;
        assert_eq!(found("", doc).as_deref(), Some(doc));
        assert_eq!(found("/a/b~1c/0", doc).as_deref(), Some("10"));
        assert_eq!(
            found("/a/b~1c/1/~0x", doc).as_deref(),
            Some("1.50000000000000000001")
        );
        assert_eq!(found("/", doc).as_deref(), Some("5"));
        // An escaped name is its text; of two members of one name, the last counts.
        assert_eq!(found("/e", doc).as_deref(), Some("7"));
        for missing in ["/b", "/a/b~1c/2", "/a/b~1c/01", "/a/b~1c/0/x", "/a/b~1c/-"] {
            assert_eq!(found(missing, doc), None, "{missing}");
        }
    }

    #[test]
    fn a_parsed_value_finds_what_its_text_does() -> Result<(), serde_json::Error> {
        let doc = r#"{"a": {"b": [1, 2]}, "c": "x", "\u0064": 1}"#;
        let whole: &RawValue = serde_json::from_str(doc)?;
        let parsed = Parsed::new(whole)?;
        for pointer in ["", "/a", "/a/b/1", "/c", "/d", "/c/0", "/e"] {
            let pointer = JsonPointer::parse(pointer).unwrap_or_else(|e| panic!("{e}"));
            let found = |raw: Option<&RawValue>| raw.map(|raw| raw.get().to_string());
            assert_eq!(
                found(pointer.find_parsed(&parsed)?),
                found(pointer.find(whole)?),
                "{pointer}"
            );
        }
        Ok(())
    }

    #[test]
    fn refuses_what_is_not_a_pointer() {
        for bad in ["events", "/a~2", "/a~"] {
            assert!(JsonPointer::parse(bad).is_err(), "{bad}");
        }
        let bad_json = JsonPointer::parse("/a").map(|p| p.find_in(b"{\"a\": ").is_err());
        assert_eq!(bad_json, Ok(true));
    }
}
