//! Builder-style setters for the public option structs (core). Option structs are
//! `#[non_exhaustive]` so that new fields do not break callers: outside this crate they are
//! made from `Default` and set field by field, either by assignment or with these setters,
//! e.g. `FlashOptions::default().causal(true).return_lse(true)`.

/// Defines one `pub fn field(self, value) -> Self` per listed field of a struct.
#[macro_export]
#[doc(hidden)]
macro_rules! setters {
    ($t:ty { $($f:ident: $ft:ty),* $(,)? }) => {
        impl $t {
            $(
                #[doc = concat!("Sets `", stringify!($f), "` (builder style; see the field).")]
                #[must_use]
                pub fn $f(mut self, value: $ft) -> Self {
                    self.$f = value;
                    self
                }
            )*
        }
    };
}
