//! Role options that are flags too. The option structs of the roles
//! (`WorkerOptions`, `CoordinatorOptions`) derive `clap::Args`: their
//! flags, environment variables and defaults are written once, on the
//! fields, and [`defaults`] builds a struct's `Default` from those same
//! attributes, so a library caller, the embedded engine and the command
//! line never disagree.

use std::time::Duration;

/// The struct `T` with every field at its flag's default. Environment
/// variables are ignored: a library default does not depend on the
/// process's environment.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults"))
        .no_binary_name(true)
        .mut_args(|a| a.env(None));
    let matches = cmd
        .try_get_matches_from(std::iter::empty::<String>())
        .unwrap_or_else(|e| {
            panic!(
                "every option of {} has a default: {e}",
                std::any::type_name::<T>()
            )
        });
    T::from_arg_matches(&matches)
        .unwrap_or_else(|e| panic!("the defaults of {} parse: {e}", std::any::type_name::<T>()))
}

/// A flag's duration (`500ms`, `30s`, `5m`), as the config writes durations.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<crate::Duration>().map(crate::Duration::std)
}
