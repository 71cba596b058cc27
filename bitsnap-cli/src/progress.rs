//! Progress bars on stderr, shown only when stderr is a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Whether progress should be drawn: stderr is a terminal.
pub fn enabled() -> bool {
    std::io::stderr().is_terminal()
}

fn styled(bar: ProgressBar, template: &str) -> ProgressBar {
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A bar counting `total` bytes, or a hidden one when stderr is not a terminal.
pub fn bytes(total: u64, message: &str) -> ProgressBar {
    if !enabled() {
        return ProgressBar::hidden();
    }
    let bar = styled(
        ProgressBar::new(total),
        "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    );
    bar.set_message(message.to_string());
    bar
}

/// A bar counting `total` items, or a hidden one when stderr is not a terminal.
pub fn items(total: u64, message: &str) -> ProgressBar {
    if !enabled() {
        return ProgressBar::hidden();
    }
    let bar = styled(
        ProgressBar::new(total),
        "{spinner} {msg} [{bar:30}] {pos}/{len} elapsed {elapsed}",
    );
    bar.set_message(message.to_string());
    bar
}

/// A spinner, or a hidden one when stderr is not a terminal.
pub fn spinner(message: &str) -> ProgressBar {
    if !enabled() {
        return ProgressBar::hidden();
    }
    let bar = styled(ProgressBar::new_spinner(), "{spinner} {msg} {elapsed}");
    bar.set_message(message.to_string());
    bar
}
