//! Failure kinds: each family is declared once, as an enum whose variants carry their metric names
//! and whose `ALL` lists every variant, so INFO shows each kind (at zero too) and a new kind cannot be
//! left out of it.

/// Declares `enum $name { Variant => "metric_name", ... }` with `name()` and `ALL`.
macro_rules! kinds {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every kind, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The metric name of this kind.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }
    };
}

pub(crate) use kinds;

/// Counts per kind name, for INFO.
pub struct Tally(std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>);

impl Tally {
    pub const fn new() -> Self {
        Tally(std::sync::Mutex::new(std::collections::BTreeMap::new()))
    }

    pub fn add(&self, kind: &'static str) {
        *self.lock().entry(kind).or_default() += 1;
    }

    /// The count of each of `names` (zero when never seen), as INFO fields `<prefix><name>`.
    pub fn fields<'n>(
        &self,
        prefix: &str,
        names: impl IntoIterator<Item = &'n str>,
    ) -> Vec<(String, i64)> {
        let map = self.lock();
        names
            .into_iter()
            .map(|n| {
                (
                    format!("{prefix}{n}"),
                    map.get(n).copied().unwrap_or(0) as i64,
                )
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<&'static str, u64>> {
        crate::sync::lock(&self.0)
    }
}
