//! Go's types and their `Decode`/`Encode` with `Unmarshal`'s and `Marshal`'s rules; `go_struct!`.

use super::*;

/// Go's `Unmarshal` of the next value of a checked document into an existing value of this type.
pub trait Decode {
    /// Decodes into `self`. After an error the value is partly decoded and the reader is anywhere:
    /// both are dropped.
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError>;
    /// Whether the next value would decode into this type (the same answer as `decode`), keeping
    /// nothing of it.
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError>;
}

/// Go's `Marshal` of this type; an error only where Go refuses to write (a time it cannot show).
pub trait Encode {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String>;
    /// Go's `omitempty` test.
    fn is_empty(&self) -> bool;
}

impl Decode for String {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if !r.null() {
            let s = r.string().ok_or_else(|| r.mismatch("string"))?;
            *self = s.text().into_owned();
        }
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        if !r.null() {
            r.string().ok_or_else(|| r.mismatch("string"))?;
        }
        Ok(())
    }
}

impl Encode for String {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        write_str(out, self);
        Ok(())
    }
    fn is_empty(&self) -> bool {
        str::is_empty(self)
    }
}

/// An int64 from the next value: `None` for `null`.
pub(super) fn read_i64(r: &mut Reader<'_>) -> Result<Option<i64>, TypeError> {
    if r.null() {
        return Ok(None);
    }
    let n = r.number().ok_or_else(|| r.mismatch("int64"))?;
    n.parse()
        .map(Some)
        .map_err(|_| TypeError(format!("cannot unmarshal number {} into int64", bounded(n))))
}

impl Decode for i64 {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if let Some(n) = read_i64(r)? {
            *self = n;
        }
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        read_i64(r).map(drop)
    }
}

impl Encode for i64 {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        out.extend_from_slice(self.to_string().as_bytes());
        Ok(())
    }
    fn is_empty(&self) -> bool {
        *self == 0
    }
}

/// A bool from the next value: `None` for `null`.
pub(super) fn read_bool(r: &mut Reader<'_>) -> Result<Option<bool>, TypeError> {
    if r.null() {
        return Ok(None);
    }
    r.boolean().map(Some).ok_or_else(|| r.mismatch("bool"))
}

impl Decode for bool {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if let Some(b) = read_bool(r)? {
            *self = b;
        }
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        read_bool(r).map(drop)
    }
}

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        out.extend_from_slice(if *self { b"true" } else { b"false" });
        Ok(())
    }
    fn is_empty(&self) -> bool {
        !*self
    }
}

/// A time from the next value: `None` for `null`.
pub(super) fn read_time(r: &mut Reader<'_>) -> Result<Option<GoTime>, TypeError> {
    if r.null() {
        return Ok(None);
    }
    let Some(s) = r.string() else {
        return Err(TypeError(
            "Time.UnmarshalJSON: input is not a JSON string".into(),
        ));
    };
    // Go parses the literal's raw bytes: an escaped or non-UTF-8 literal is no time.
    let text = s
        .verbatim()
        .ok_or_else(|| TypeError("parsing time: escaped text".into()))?;
    GoTime::parse(text)
        .map(Some)
        .ok_or_else(|| TypeError(format!("parsing time {:?}", bounded(text))))
}

impl Decode for GoTime {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if let Some(t) = read_time(r)? {
            *self = t;
        }
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        read_time(r).map(drop)
    }
}

impl Encode for GoTime {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        self.write_json(out)
    }
    fn is_empty(&self) -> bool {
        false
    }
}

/// A value of Go type `any` (`interface{}`): the text Go writes for it (see the module's notes), `None`
/// for nil.
#[derive(Debug, PartialEq, Default)]
pub struct Any(Option<Box<[u8]>>);

impl Decode for Any {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            self.0 = None;
            return Ok(());
        }
        let text = if matches!(r.peek(), Some(b'{' | b'[')) {
            // Sized by the input, which Go's text rarely passes: a large value is not copied as it
            // grows.
            let raw = r.skip()?;
            raw.reader().any(raw.0.len())?
        } else {
            r.any(0)?
        };
        self.0 = Some(text.into_boxed_slice());
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        r.any_fits()
    }
}

impl Encode for Any {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        out.extend_from_slice(self.0.as_deref().unwrap_or(b"null"));
        Ok(())
    }
    fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

/// A Go pointer `*T`: `None` is nil.
pub type Ptr<T> = Option<Box<T>>;

impl<T: Decode + Default> Decode for Option<Box<T>> {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            *self = None;
            return Ok(());
        }
        self.get_or_insert_with(Box::default).decode(r)
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            return Ok(());
        }
        T::accepts(r)
    }
}

impl<T: Encode> Encode for Option<Box<T>> {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Some(v) => v.encode(out),
            None => {
                out.extend_from_slice(b"null");
                Ok(())
            }
        }
    }
    fn is_empty(&self) -> bool {
        self.is_none()
    }
}

/// A Go `map[string]V`: `None` is a nil map (`null`), `Some` of an empty one is `{}`.
#[derive(Debug, PartialEq, Default)]
pub struct GoMap<V>(pub Option<BTreeMap<String, V>>);

impl<V> GoMap<V> {
    /// An empty, non-nil map.
    pub fn empty() -> Self {
        GoMap(Some(BTreeMap::new()))
    }
}

impl<V: Decode + Default> Decode for GoMap<V> {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            self.0 = None;
            return Ok(());
        }
        if !r.object() {
            return Err(r.mismatch("map"));
        }
        let map = self.0.get_or_insert_with(BTreeMap::new);
        while let Some(key) = r.key()? {
            // Each entry starts from a zero value: entries are replaced, never merged.
            let mut elem = V::default();
            elem.decode(r)?;
            map.insert(key.text().into_owned(), elem);
        }
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            return Ok(());
        }
        if !r.object() {
            return Err(r.mismatch("map"));
        }
        while r.key()?.is_some() {
            V::accepts(r)?;
        }
        Ok(())
    }
}

impl<V: Encode> Encode for GoMap<V> {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let Some(map) = &self.0 else {
            out.extend_from_slice(b"null");
            return Ok(());
        };
        out.push(b'{');
        for (i, (k, v)) in map.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, k);
            out.push(b':');
            v.encode(out)?;
        }
        out.push(b'}');
        Ok(())
    }
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(BTreeMap::is_empty)
    }
}

/// A Go slice `[]T`: `None` is nil (`null`), `Some` of an empty one is `[]`.
#[derive(Debug, PartialEq, Default)]
pub struct GoSlice<T>(pub Option<Vec<T>>);

impl<T: Decode + Default> Decode for GoSlice<T> {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            self.0 = None;
            return Ok(());
        }
        if !r.array() {
            return Err(r.mismatch("slice"));
        }
        // Go decodes into the elements already there (a `null` element keeps one) and cuts the slice
        // to the array's length.
        let vec = self.0.get_or_insert_with(Vec::new);
        let mut len = 0;
        while r.item() {
            match vec.get_mut(len) {
                Some(elem) => elem.decode(r)?,
                None => {
                    let mut elem = T::default();
                    elem.decode(r)?;
                    vec.push(elem);
                }
            }
            len += 1;
        }
        vec.truncate(len);
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            return Ok(());
        }
        if !r.array() {
            return Err(r.mismatch("slice"));
        }
        while r.item() {
            T::accepts(r)?;
        }
        Ok(())
    }
}

impl<T: Encode> Encode for GoSlice<T> {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let Some(items) = &self.0 else {
            out.extend_from_slice(b"null");
            return Ok(());
        };
        out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            item.encode(out)?;
        }
        out.push(b']');
        Ok(())
    }
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(Vec::is_empty)
    }
}

/// Whether an object key names a struct field tagged `tag` (ASCII, lowercase): exactly, or as Go
/// matches case-insensitively (Unicode simple folding: `K` KELVIN SIGN is `k`, `ſ` LONG S is `s`).
pub fn names_field(key: &str, tag: &str) -> bool {
    if key == tag {
        return true;
    }
    let mut tag = tag.bytes();
    for c in key.chars() {
        let folded = match c {
            '\u{212A}' => b'k',
            '\u{17F}' => b's',
            c if c.is_ascii() => (c as u8).to_ascii_lowercase(),
            _ => return false,
        };
        if tag.next() != Some(folded) {
            return false;
        }
    }
    tag.next().is_none()
}

/// The error for a struct given anything but an object or `null`.
pub fn not_an_object(go_type: &str) -> TypeError {
    TypeError(format!("cannot unmarshal a non-object into {go_type}"))
}

/// Declares a Go struct: its fields with their JSON names (`omitempty` where Go's tag says so), and
/// `Decode`/`Encode` with Go's rules for structs (each key applied in turn to the field it names, an
/// exact match first, then by `names_field`; other keys skipped; `null` leaves the struct as it is;
/// anything but an object is a type error).
macro_rules! go_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $field:ident : $ty:ty = $tag:literal $($omit:ident)? ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, PartialEq, Default)]
        pub struct $name {
            $( pub $field: $ty, )*
        }

        impl $crate::format::gojson::Decode for $name {
            fn decode(
                &mut self,
                r: &mut $crate::format::gojson::Reader<'_>,
            ) -> Result<(), $crate::format::gojson::TypeError> {
                use $crate::format::gojson::{names_field, not_an_object, Decode};
                if r.null() {
                    return Ok(());
                }
                if !r.object() {
                    return Err(not_an_object(stringify!($name)));
                }
                while let Some(key) = r.key()? {
                    let key = key.text();
                    $(
                        if key == $tag {
                            Decode::decode(&mut self.$field, r)?;
                            continue;
                        }
                    )*
                    $(
                        if names_field(&key, $tag) {
                            Decode::decode(&mut self.$field, r)?;
                            continue;
                        }
                    )*
                    r.skip()?;
                }
                Ok(())
            }

            fn accepts(
                r: &mut $crate::format::gojson::Reader<'_>,
            ) -> Result<(), $crate::format::gojson::TypeError> {
                use $crate::format::gojson::{names_field, not_an_object, Decode};
                if r.null() {
                    return Ok(());
                }
                if !r.object() {
                    return Err(not_an_object(stringify!($name)));
                }
                while let Some(key) = r.key()? {
                    let key = key.text();
                    $(
                        if key == $tag {
                            <$ty as Decode>::accepts(r)?;
                            continue;
                        }
                    )*
                    $(
                        if names_field(&key, $tag) {
                            <$ty as Decode>::accepts(r)?;
                            continue;
                        }
                    )*
                    r.skip()?;
                }
                Ok(())
            }
        }

        impl $crate::format::gojson::Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
                out.push(b'{');
                let mut first = true;
                $(
                    let omitted = go_struct!(@omit $($omit)?)
                        && $crate::format::gojson::Encode::is_empty(&self.$field);
                    if !omitted {
                        if !first {
                            out.push(b',');
                        }
                        first = false;
                        out.extend_from_slice(concat!("\"", $tag, "\":").as_bytes());
                        $crate::format::gojson::Encode::encode(&self.$field, out)?;
                    }
                )*
                let _ = first;
                out.push(b'}');
                Ok(())
            }
            fn is_empty(&self) -> bool {
                false
            }
        }
    };
    (@omit omitempty) => { true };
    (@omit) => { false };
}
pub(crate) use go_struct;
