//! DeleteTopics, by name (v1-v5) or by name or id (v6).

use protocol::kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use protocol::kafka_protocol::messages::{DeleteTopicsRequest, DeleteTopicsResponse, TopicName};
use protocol::ResponseError;
use uuid::Uuid;

use super::create_topics::topic_error;
use super::{code, text};
use crate::Broker;

pub fn handle(broker: &Broker, request: DeleteTopicsRequest, version: i16) -> DeleteTopicsResponse {
    let wanted: Vec<(Option<TopicName>, Uuid)> = if version >= 6 {
        request
            .topics
            .into_iter()
            .map(|t| (t.name, t.topic_id))
            .collect()
    } else {
        request
            .topic_names
            .into_iter()
            .map(|n| (Some(n), Uuid::nil()))
            .collect()
    };
    let mut response = DeleteTopicsResponse::default();
    for (name, id) in wanted {
        let topic = match &name {
            Some(name) => broker.topics.get(&name.0),
            None => broker.topics.get_by_id(id),
        };
        let mut result = DeletableTopicResult::default()
            .with_name(name.clone())
            .with_topic_id(id);
        match topic {
            None => {
                let err = if name.is_some() {
                    ResponseError::UnknownTopicOrPartition
                } else {
                    ResponseError::UnknownTopicId
                };
                result.error_code = code(err);
            }
            Some(topic) => {
                result.name = Some(TopicName(text(topic.name.clone())));
                result.topic_id = topic.id;
                match broker.topics.delete(&topic.name) {
                    Ok(_) => broker.metrics.forget_topic(&topic.name),
                    Err(e) => {
                        let (err, message) = topic_error(e);
                        result.error_code = code(err);
                        result.error_message = Some(text(message));
                    }
                }
            }
        }
        response.responses.push(result);
    }
    response
}
