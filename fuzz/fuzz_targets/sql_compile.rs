//! Every pipeline file a user can send (`PUT /pipelines/NAME`), through
//! `sql::compile`: a plan or an error with a position inside the text, never a panic.
//! A plan's expressions are then evaluated on a record, and the plan goes through the
//! JSON form its hash is taken of.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sql::expr::{Context, Input};
use sql::plan::Body;
use sql::{Catalog, TopicInfo};

struct Topics;

impl Catalog for Topics {
    fn topic(&self, name: &str) -> Option<TopicInfo> {
        match name {
            "tweets" => Some(TopicInfo {
                columns: Some(["city", "user_id", "retweet", "created_at", "user", "v"].map(String::from).to_vec()),
            }),
            "raw" => Some(TopicInfo { columns: None }),
            _ => None,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match sql::compile(text, &Topics) {
        Err(e) => {
            assert!(e.line >= 1 && e.column >= 1, "{e}");
            assert!(e.line as usize <= text.lines().count().max(1) + 1, "{e}");
        }
        Ok(plan) => {
            let json = serde_json::json!({"city": "paris", "user_id": 7, "retweet": true,
                "created_at": 1_700_000_000_000i64, "user": {"id": 1}, "v": 2.5, "s": "x"});
            let headers = [("h".to_string(), Some(b"v".to_vec()))];
            let input = Input { json: sql::expr::Json::Value(&json), raw: b"{}", key: Some(b"k"), timestamp: 1,
                                partition: 0, offset: 0, headers: &headers };
            for q in &plan.queries {
                if let Some(f) = &q.filter {
                    let _ = f.eval(&Context::Input(&input));
                }
                if let Body::Aggregate(a) = &q.body {
                    for k in &a.keys {
                        let _ = k.eval(&Context::Input(&input));
                    }
                }
            }
            let encoded = serde_json::to_string(&plan).expect("a plan serializes");
            let decoded: sql::Pipeline = serde_json::from_str(&encoded).expect("and reads back");
            assert_eq!(serde_json::to_string(&decoded).unwrap(), encoded);
        }
    }
});
