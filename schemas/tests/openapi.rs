#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The committed `openapi.json` is the document the bridge serves (`UPDATE_OPENAPI=1`
//! rewrites it).

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.json");

#[test]
fn the_committed_openapi_json_is_the_document_built_from_the_declarations() {
    let built = serde_json::to_string_pretty(&schemas::openapi::document()).unwrap() + "\n";
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(FILE, &built).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(FILE).unwrap_or_default();
    assert!(
        committed == built,
        "openapi.json differs from the document built from schemas::admin: run \
         `UPDATE_OPENAPI=1 cargo test -p schemas --test openapi` and commit it"
    );
}
