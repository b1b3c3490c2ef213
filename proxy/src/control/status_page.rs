//! The HTML status page (`GET /` on the admin listener).

/// Renders the page from the `/status` document.
pub fn render(status: &serde_json::Value) -> String {
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Usher</title></head><body><pre>{}</pre></body></html>",
        status
    )
}
