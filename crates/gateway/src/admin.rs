//! Admin requests through librdkafka's C API, for the CLI's tools and the web console,
//! for what the rdkafka crate does not wrap
//! (IncrementalAlterConfigs: its AdminClient only has the older AlterConfigs, which
//! resets every key not named) or wraps without the cluster's error message
//! (CreateTopics, DeleteTopics: its `TopicResult` keeps only the code, and the message
//! is what tells the user which config or name was wrong).
//!
//! ListConsumerGroups and DescribeConsumerGroups are here too: the rdkafka crate's
//! `fetch_group_list` describes every group of the cluster, where a page of the
//! console lists names and describes only the groups it shows.
//!
//! Also the one place where librdkafka error codes are turned into Kafka error names.
//!
//! The unsafe code of the admin requests lives here. Every librdkafka object is owned by a
//! [`Native`] guard that destroys it on every exit path, and every returned pointer is
//! checked for null before use.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};

use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::client::Client;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

/// How long an admin request waits for the cluster's answer before giving up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The Kafka name of an error code: `TOPIC_ALREADY_EXISTS`, `UNKNOWN_TOPIC_OR_PARTITION`
/// for errors the cluster returned, and librdkafka's own underscore-prefixed names
/// (`_MSG_TIMED_OUT`, `_TRANSPORT`) for errors raised inside the client.
///
/// This is the only place that maps error codes to names. librdkafka's
/// `rd_kafka_err2name` already has upper-snake names, and they are Kafka's own
/// (`org.apache.kafka.common.protocol.Errors`) except for the few codes below, where it
/// keeps an old or shortened spelling; those are corrected so that what the user reads
/// matches the Kafka documentation and every other Kafka tool.
pub fn error_name(code: RDKafkaErrorCode) -> String {
    let kafka_name = match code as i32 {
        -1 => Some("UNKNOWN_SERVER_ERROR"),      // librdkafka: UNKNOWN
        2 => Some("CORRUPT_MESSAGE"),            // INVALID_MSG
        3 => Some("UNKNOWN_TOPIC_OR_PARTITION"), // UNKNOWN_TOPIC_OR_PART
        4 => Some("INVALID_FETCH_SIZE"),         // INVALID_MSG_SIZE
        6 => Some("NOT_LEADER_OR_FOLLOWER"),     // NOT_LEADER_FOR_PARTITION
        10 => Some("MESSAGE_TOO_LARGE"),         // MSG_SIZE_TOO_LARGE
        11 => Some("STALE_CONTROLLER_EPOCH"),    // STALE_CTRL_EPOCH
        17 => Some("INVALID_TOPIC_EXCEPTION"),   // TOPIC_EXCEPTION
        _ => None,
    };
    if let Some(name) = kafka_name {
        return name.to_owned();
    }
    match RDKafkaRespErr::try_from(code as i32) {
        Ok(native) => {
            // SAFETY: rd_kafka_err2name returns a pointer to a static, NUL-terminated
            // string for every code, including unknown ones.
            let name = unsafe { CStr::from_ptr(rdkafka::bindings::rd_kafka_err2name(native)) };
            name.to_string_lossy().into_owned()
        }
        Err(_) => format!("ERROR_{}", code as i32),
    }
}

/// librdkafka's human description of a code, without the "Broker: " / "Local: " prefix
/// (the name already says which side it came from).
pub fn error_description(code: RDKafkaErrorCode) -> String {
    match RDKafkaRespErr::try_from(code as i32) {
        Ok(native) => {
            // SAFETY: as for rd_kafka_err2name, a static NUL-terminated string.
            let text = unsafe { CStr::from_ptr(rdkafka::bindings::rd_kafka_err2str(native)) };
            let text = text.to_string_lossy();
            let text = text.strip_prefix("Broker: ").unwrap_or(&text);
            text.strip_prefix("Local: ").unwrap_or(text).to_owned()
        }
        Err(_) => "unknown error".to_owned(),
    }
}

/// `NAME: description` for an error code.
pub fn describe_code(code: RDKafkaErrorCode) -> String {
    format!("{}: {}", error_name(code), error_description(code))
}

/// `NAME: description` for any rdkafka error.
pub fn describe_error(error: &KafkaError) -> String {
    match error {
        KafkaError::AdminOp(code) => describe_code(*code),
        other => match other.rdkafka_error_code() {
            Some(code) => describe_code(code),
            None => other.to_string(),
        },
    }
}

/// A topic to create.
pub struct NewTopicSpec<'a> {
    pub name: &'a str,
    /// -1 for the cluster's default.
    pub partitions: i32,
    /// -1 for the cluster's default.
    pub replication_factor: i32,
    pub configs: &'a [(String, String)],
}

/// What the cluster answered for one topic: its name, or one line `NAME: message`.
pub type TopicOutcome = Result<String, String>;

/// One change of IncrementalAlterConfigs.
pub enum ConfigChange<'a> {
    Set(&'a str, &'a str),
    Delete(&'a str),
}

/// CreateTopics; one outcome per topic, in the order the cluster answered.
pub fn create_topics(
    client: &Client<impl ClientContext>,
    topics: &[NewTopicSpec<'_>],
    validate_only: bool,
) -> Result<Vec<TopicOutcome>, String> {
    let rk = client.native_ptr();
    let mut natives = Vec::with_capacity(topics.len());
    for topic in topics {
        let name = c_string("topic name", topic.name)?;
        let mut errstr = [0 as c_char; 512];
        // SAFETY: name and errstr outlive the call; librdkafka copies the name.
        let new_topic = unsafe {
            rdsys::rd_kafka_NewTopic_new(
                name.as_ptr(),
                topic.partitions,
                topic.replication_factor,
                errstr.as_mut_ptr(),
                errstr.len(),
            )
        };
        if new_topic.is_null() {
            // SAFETY: librdkafka NUL-terminates errstr when it fails.
            return Err(
                unsafe { text(errstr.as_ptr()) }.unwrap_or_else(|| "invalid topic".to_owned())
            );
        }
        let new_topic = Native {
            ptr: new_topic,
            destroy: rdsys::rd_kafka_NewTopic_destroy,
        };
        for (key, value) in topic.configs {
            let c_key = c_string("config key", key)?;
            let c_value = c_string("config value", value)?;
            // SAFETY: new_topic is live; librdkafka copies key and value.
            let err = unsafe {
                rdsys::rd_kafka_NewTopic_set_config(new_topic.ptr, c_key.as_ptr(), c_value.as_ptr())
            };
            if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                return Err(format!("{} (config '{key}')", error_line(err, None)));
            }
        }
        natives.push(new_topic);
    }
    let mut ptrs: Vec<_> = natives.iter().map(|native| native.ptr).collect();
    let op = rdsys::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_CREATETOPICS;
    // SAFETY: rk and the topics are live for the call; librdkafka copies what it keeps.
    let event = request(rk, op, validate_only, true, |options, queue| unsafe {
        rdsys::rd_kafka_CreateTopics(rk, ptrs.as_mut_ptr(), ptrs.len(), options, queue)
    })?;
    // SAFETY: event is live; the result and its topic array are owned by the event.
    unsafe {
        let result = rdsys::rd_kafka_event_CreateTopics_result(event.ptr);
        if result.is_null() {
            return Err("unexpected event in answer to CreateTopics".to_owned());
        }
        let mut count = 0usize;
        let array = rdsys::rd_kafka_CreateTopics_result_topics(result, &mut count);
        Ok(topic_outcomes(array, count))
    }
}

/// DeleteTopics; one outcome per topic, in the order the cluster answered.
pub fn delete_topics(
    client: &Client<impl ClientContext>,
    names: &[String],
) -> Result<Vec<TopicOutcome>, String> {
    let rk = client.native_ptr();
    let mut natives = Vec::with_capacity(names.len());
    for name in names {
        let c_name = c_string("topic name", name)?;
        // SAFETY: librdkafka copies the name.
        let ptr = unsafe { rdsys::rd_kafka_DeleteTopic_new(c_name.as_ptr()) };
        natives.push(native(
            ptr,
            rdsys::rd_kafka_DeleteTopic_destroy,
            "a DeleteTopic",
        )?);
    }
    let mut ptrs: Vec<_> = natives.iter().map(|native| native.ptr).collect();
    let op = rdsys::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DELETETOPICS;
    // SAFETY: as for CreateTopics.
    let event = request(rk, op, false, true, |options, queue| unsafe {
        rdsys::rd_kafka_DeleteTopics(rk, ptrs.as_mut_ptr(), ptrs.len(), options, queue)
    })?;
    // SAFETY: as for CreateTopics.
    unsafe {
        let result = rdsys::rd_kafka_event_DeleteTopics_result(event.ptr);
        if result.is_null() {
            return Err("unexpected event in answer to DeleteTopics".to_owned());
        }
        let mut count = 0usize;
        let array = rdsys::rd_kafka_DeleteTopics_result_topics(result, &mut count);
        Ok(topic_outcomes(array, count))
    }
}

/// IncrementalAlterConfigs of one topic: only the named keys change.
pub fn incremental_alter_topic_configs(
    client: &Client<impl ClientContext>,
    topic: &str,
    changes: &[ConfigChange<'_>],
) -> Result<(), String> {
    let rk = client.native_ptr();
    let c_topic = c_string("topic name", topic)?;
    // SAFETY: librdkafka copies the name.
    let resource = native(
        unsafe {
            rdsys::rd_kafka_ConfigResource_new(
                rdsys::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
                c_topic.as_ptr(),
            )
        },
        rdsys::rd_kafka_ConfigResource_destroy,
        "a config resource",
    )?;
    for change in changes {
        let (op, key, value) = match change {
            ConfigChange::Set(key, value) => (
                rdsys::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
                *key,
                Some(*value),
            ),
            ConfigChange::Delete(key) => (
                rdsys::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_DELETE,
                *key,
                None,
            ),
        };
        let c_key = c_string("config key", key)?;
        let c_value = value
            .map(|value| c_string("config value", value))
            .transpose()?;
        let value_ptr = c_value
            .as_ref()
            .map_or(std::ptr::null(), |value| value.as_ptr());
        // SAFETY: resource is live; librdkafka copies key and value (null for DELETE).
        let error = unsafe {
            rdsys::rd_kafka_ConfigResource_add_incremental_config(
                resource.ptr,
                c_key.as_ptr(),
                op,
                value_ptr,
            )
        };
        if !error.is_null() {
            let error = Native {
                ptr: error,
                destroy: rdsys::rd_kafka_error_destroy,
            };
            // SAFETY: error is live; its string is owned by it.
            let (code, message) = unsafe {
                (
                    rdsys::rd_kafka_error_code(error.ptr),
                    text(rdsys::rd_kafka_error_string(error.ptr)),
                )
            };
            return Err(format!("{} (config '{key}')", error_line(code, message)));
        }
    }
    let mut resources = [resource.ptr];
    let op = rdsys::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS;
    // SAFETY: as for CreateTopics.
    let event = request(rk, op, false, false, |options, queue| unsafe {
        rdsys::rd_kafka_IncrementalAlterConfigs(
            rk,
            resources.as_mut_ptr(),
            resources.len(),
            options,
            queue,
        )
    })?;
    // SAFETY: event is live; the result and its resources are owned by the event.
    unsafe {
        let result = rdsys::rd_kafka_event_IncrementalAlterConfigs_result(event.ptr);
        if result.is_null() {
            return Err("unexpected event in answer to IncrementalAlterConfigs".to_owned());
        }
        let mut count = 0usize;
        let answered = rdsys::rd_kafka_IncrementalAlterConfigs_result_resources(result, &mut count);
        if answered.is_null() || count == 0 {
            return Err(
                "the cluster answered IncrementalAlterConfigs without any resource".to_owned(),
            );
        }
        for i in 0..count {
            let resource = *answered.add(i);
            let err = rdsys::rd_kafka_ConfigResource_error(resource);
            if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                let message = text(rdsys::rd_kafka_ConfigResource_error_string(resource));
                return Err(with_topic(error_line(err, message), topic));
            }
        }
    }
    Ok(())
}

/// A group as ListGroups names it, with its state.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupListing {
    pub name: String,
    /// `Stable`, `Empty`, ... (`Unknown` from a cluster older than ListGroups v4).
    pub state: String,
    /// No protocol type: a client that only commits offsets (no subscription).
    pub simple: bool,
}

/// ListConsumerGroups: every group of every broker with its state, nothing described
/// (the rdkafka crate's `fetch_group_list` describes every group it lists). A broker
/// that cannot answer makes it fail: a partial list would look complete.
pub fn list_consumer_groups(
    client: &Client<impl ClientContext>,
) -> Result<Vec<GroupListing>, String> {
    let rk = client.native_ptr();
    let op = rdsys::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPS;
    // SAFETY: rk is live for the call.
    let event = request(rk, op, false, false, |options, queue| unsafe {
        rdsys::rd_kafka_ListConsumerGroups(rk, options, queue)
    })?;
    // SAFETY: event is live; the result, its listings and errors are owned by it.
    unsafe {
        let result = rdsys::rd_kafka_event_ListConsumerGroups_result(event.ptr);
        if result.is_null() {
            return Err("unexpected event in answer to ListGroups".to_owned());
        }
        let mut count = 0usize;
        let errors = rdsys::rd_kafka_ListConsumerGroups_result_errors(result, &mut count);
        if !errors.is_null() && count > 0 {
            let error = *errors;
            let message = text(rdsys::rd_kafka_error_string(error));
            return Err(error_line(rdsys::rd_kafka_error_code(error), message));
        }
        let listings = rdsys::rd_kafka_ListConsumerGroups_result_valid(result, &mut count);
        if listings.is_null() {
            return Ok(Vec::new());
        }
        Ok((0..count)
            .map(|i| {
                let listing = *listings.add(i);
                GroupListing {
                    name: text(rdsys::rd_kafka_ConsumerGroupListing_group_id(listing))
                        .unwrap_or_default(),
                    state: state_name(rdsys::rd_kafka_ConsumerGroupListing_state(listing)),
                    simple: rdsys::rd_kafka_ConsumerGroupListing_is_simple_consumer_group(listing)
                        != 0,
                }
            })
            .collect())
    }
}

/// What DescribeConsumerGroups tells of one group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupDescription {
    pub name: String,
    pub state: String,
    pub members: usize,
    /// The assignor the members chose (`range`, `cooperative-sticky`; empty when none).
    pub assignor: String,
    /// `NAME: message` when the coordinator could not describe it.
    pub error: Option<String>,
}

/// DescribeConsumerGroups of the named groups only, in one request per coordinator.
pub fn describe_consumer_groups(
    client: &Client<impl ClientContext>,
    names: &[&str],
) -> Result<Vec<GroupDescription>, String> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let rk = client.native_ptr();
    let c_names = names
        .iter()
        .map(|name| c_string("group id", name))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ptrs: Vec<*const c_char> = c_names.iter().map(|name| name.as_ptr()).collect();
    let op = rdsys::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS;
    // SAFETY: the names outlive the call (librdkafka copies them); rk is live.
    let event = request(rk, op, false, false, |options, queue| unsafe {
        rdsys::rd_kafka_DescribeConsumerGroups(rk, ptrs.as_mut_ptr(), ptrs.len(), options, queue)
    })?;
    // SAFETY: event is live; the result and its descriptions are owned by it.
    unsafe {
        let result = rdsys::rd_kafka_event_DescribeConsumerGroups_result(event.ptr);
        if result.is_null() {
            return Err("unexpected event in answer to DescribeGroups".to_owned());
        }
        let mut count = 0usize;
        let groups = rdsys::rd_kafka_DescribeConsumerGroups_result_groups(result, &mut count);
        if groups.is_null() {
            return Ok(Vec::new());
        }
        Ok((0..count)
            .map(|i| {
                let group = *groups.add(i);
                let error = rdsys::rd_kafka_ConsumerGroupDescription_error(group);
                GroupDescription {
                    name: text(rdsys::rd_kafka_ConsumerGroupDescription_group_id(group))
                        .unwrap_or_default(),
                    state: state_name(rdsys::rd_kafka_ConsumerGroupDescription_state(group)),
                    members: rdsys::rd_kafka_ConsumerGroupDescription_member_count(group),
                    assignor: text(rdsys::rd_kafka_ConsumerGroupDescription_partition_assignor(
                        group,
                    ))
                    .unwrap_or_default(),
                    error: (!error.is_null()).then(|| {
                        error_line(
                            rdsys::rd_kafka_error_code(error),
                            text(rdsys::rd_kafka_error_string(error)),
                        )
                    }),
                }
            })
            .collect())
    }
}

/// Every partition `group` has committed an offset for, with the offset (OffsetFetch
/// with no topics named, as `kafka-consumer-groups --describe` asks): what the
/// coordinator holds, however many topics the cluster has.
pub fn list_group_offsets(
    client: &Client<impl ClientContext>,
    group: &str,
) -> Result<Vec<CommittedOffset>, String> {
    let rk = client.native_ptr();
    let c_group = c_string("group id", group)?;
    // SAFETY: librdkafka copies the group id; a null list asks for every partition.
    let wanted = native(
        unsafe { rdsys::rd_kafka_ListConsumerGroupOffsets_new(c_group.as_ptr(), std::ptr::null()) },
        rdsys::rd_kafka_ListConsumerGroupOffsets_destroy,
        "a group offsets request",
    )?;
    let mut requests = [wanted.ptr];
    let op = rdsys::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPOFFSETS;
    // SAFETY: rk and the request are live for the call; librdkafka copies the request.
    let event = request(rk, op, false, false, |options, queue| unsafe {
        rdsys::rd_kafka_ListConsumerGroupOffsets(
            rk,
            requests.as_mut_ptr(),
            requests.len(),
            options,
            queue,
        )
    })?;
    // SAFETY: event is live; the result, its group and list are owned by it, and the
    // list is copied before the event goes.
    unsafe {
        let result = rdsys::rd_kafka_event_ListConsumerGroupOffsets_result(event.ptr);
        if result.is_null() {
            return Err("unexpected event in answer to OffsetFetch".to_owned());
        }
        let mut count = 0usize;
        let groups = rdsys::rd_kafka_ListConsumerGroupOffsets_result_groups(result, &mut count);
        if groups.is_null() || count == 0 {
            return Err("the cluster answered OffsetFetch without the group".to_owned());
        }
        let group = *groups;
        let error = rdsys::rd_kafka_group_result_error(group);
        if !error.is_null() {
            return Err(error_line(
                rdsys::rd_kafka_error_code(error),
                text(rdsys::rd_kafka_error_string(error)),
            ));
        }
        let list = rdsys::rd_kafka_group_result_partitions(group);
        if list.is_null() || (*list).elems.is_null() {
            return Ok(Vec::new());
        }
        let count = usize::try_from((*list).cnt).unwrap_or(0);
        let mut committed = Vec::with_capacity(count);
        for i in 0..count {
            let element = &*(*list).elems.add(i);
            if element.err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                return Err(error_line(element.err, None));
            }
            let metadata = if element.metadata.is_null() {
                String::new()
            } else {
                let bytes = std::slice::from_raw_parts(
                    element.metadata as *const u8,
                    element.metadata_size,
                );
                String::from_utf8_lossy(bytes).into_owned()
            };
            committed.push(CommittedOffset {
                topic: text(element.topic).unwrap_or_default(),
                partition: element.partition,
                offset: element.offset,
                metadata,
            });
        }
        Ok(committed)
    }
}

/// One committed offset of a group.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedOffset {
    pub topic: String,
    pub partition: i32,
    /// Negative: none (librdkafka's `OFFSET_INVALID`).
    pub offset: i64,
    pub metadata: String,
}

fn state_name(state: rdsys::rd_kafka_consumer_group_state_t) -> String {
    // SAFETY: librdkafka returns a static string for every state.
    unsafe { text(rdsys::rd_kafka_consumer_group_state_name(state)) }.unwrap_or_default()
}

/// Owns a librdkafka object and destroys it exactly once.
struct Native<T> {
    ptr: *mut T,
    destroy: unsafe extern "C" fn(*mut T),
}

impl<T> Drop for Native<T> {
    fn drop(&mut self) {
        // SAFETY: ptr is non-null (checked at construction) and came from the
        // constructor matching `destroy`.
        unsafe { (self.destroy)(self.ptr) }
    }
}

fn native<T>(
    ptr: *mut T,
    destroy: unsafe extern "C" fn(*mut T),
    what: &str,
) -> Result<Native<T>, String> {
    if ptr.is_null() {
        return Err(format!("librdkafka could not create {what}"));
    }
    Ok(Native { ptr, destroy })
}

fn c_string(what: &str, value: &str) -> Result<CString, String> {
    CString::new(value).map_err(|_| format!("{what} '{value}' contains a NUL byte"))
}

/// An owned copy of a C string, `None` for null or empty.
///
/// # Safety
/// `ptr` is null or points to a NUL-terminated string that lives for this call.
unsafe fn text(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    let text = CStr::from_ptr(ptr).to_string_lossy().trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// `NAME: message`, with librdkafka's description when the cluster sent no message.
/// (For request versions without an error message field librdkafka fills in its own
/// "Broker: ..." text; that is the description again, so it gets the same form.)
fn error_line(err: rdsys::rd_kafka_resp_err_t, message: Option<String>) -> String {
    let code = RDKafkaErrorCode::from(err);
    let message = match message {
        Some(message) if !message.starts_with("Broker: ") && !message.starts_with("Local: ") => {
            message
        }
        _ => error_description(code),
    };
    format!("{}: {message}", error_name(code))
}

/// Names the topic unless the message already does.
fn with_topic(line: String, topic: &str) -> String {
    if line.contains(&format!("'{topic}'")) {
        line
    } else {
        format!("{line} (topic '{topic}')")
    }
}

fn timeout_ms() -> c_int {
    c_int::try_from(REQUEST_TIMEOUT.as_millis()).unwrap_or(c_int::MAX)
}

fn admin_options(
    rk: *mut rdsys::rd_kafka_t,
    op: rdsys::rd_kafka_admin_op_t,
    validate_only: bool,
    operation_timeout: bool,
) -> Result<Native<rdsys::rd_kafka_AdminOptions_t>, String> {
    // SAFETY: rk is the live client handle.
    let options = native(
        unsafe { rdsys::rd_kafka_AdminOptions_new(rk, op) },
        rdsys::rd_kafka_AdminOptions_destroy,
        "admin options",
    )?;
    let mut errstr = [0 as c_char; 512];
    let check = |err: rdsys::rd_kafka_resp_err_t, errstr: &[c_char]| {
        if err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            Ok(())
        } else {
            // SAFETY: librdkafka NUL-terminates errstr when it fails.
            Err(unsafe { text(errstr.as_ptr()) }.unwrap_or_else(|| error_line(err, None)))
        }
    };
    // SAFETY: options is live; errstr is large enough for librdkafka's messages.
    unsafe {
        let err = rdsys::rd_kafka_AdminOptions_set_request_timeout(
            options.ptr,
            timeout_ms(),
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        check(err, &errstr)?;
        if operation_timeout {
            // How long the cluster may take to finish the operation before answering.
            let err = rdsys::rd_kafka_AdminOptions_set_operation_timeout(
                options.ptr,
                timeout_ms(),
                errstr.as_mut_ptr(),
                errstr.len(),
            );
            check(err, &errstr)?;
        }
        if validate_only {
            let err = rdsys::rd_kafka_AdminOptions_set_validate_only(
                options.ptr,
                1,
                errstr.as_mut_ptr(),
                errstr.len(),
            );
            check(err, &errstr)?;
        }
    }
    Ok(options)
}

/// One admin request: `send` calls librdkafka's function for it with options (`op`'s,
/// with the request timeout) and a queue of its own; then the result event is
/// awaited. The queue goes with this call: the event does not need it.
fn request(
    rk: *mut rdsys::rd_kafka_t,
    op: rdsys::rd_kafka_admin_op_t,
    validate_only: bool,
    operation_timeout: bool,
    send: impl FnOnce(*const rdsys::rd_kafka_AdminOptions_t, *mut rdsys::rd_kafka_queue_t),
) -> Result<Native<rdsys::rd_kafka_event_t>, String> {
    let options = admin_options(rk, op, validate_only, operation_timeout)?;
    let queue = new_queue(rk)?;
    send(options.ptr, queue.ptr);
    wait_for_result(&queue)
}

fn new_queue(rk: *mut rdsys::rd_kafka_t) -> Result<Native<rdsys::rd_kafka_queue_t>, String> {
    // SAFETY: rk is the live client handle.
    native(
        unsafe { rdsys::rd_kafka_queue_new(rk) },
        rdsys::rd_kafka_queue_destroy,
        "a queue",
    )
}

/// Waits for the one result event of an admin request; a request-level error (timeout,
/// no broker) becomes `Err`.
fn wait_for_result(
    queue: &Native<rdsys::rd_kafka_queue_t>,
) -> Result<Native<rdsys::rd_kafka_event_t>, String> {
    // librdkafka enforces the request timeout itself and always posts a result event;
    // the margin only guards against a lost one.
    // SAFETY: queue is live.
    let event =
        unsafe { rdsys::rd_kafka_queue_poll(queue.ptr, timeout_ms().saturating_add(5_000)) };
    if event.is_null() {
        return Err("no answer from the cluster in time".to_owned());
    }
    let event = Native {
        ptr: event,
        destroy: rdsys::rd_kafka_event_destroy,
    };
    // SAFETY: event is live; its error string is owned by it.
    let (err, message) = unsafe {
        (
            rdsys::rd_kafka_event_error(event.ptr),
            text(rdsys::rd_kafka_event_error_string(event.ptr)),
        )
    };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(error_line(err, message));
    }
    Ok(event)
}

/// # Safety
/// `array` is null or points to `count` topic results owned by a live event.
unsafe fn topic_outcomes(
    array: *mut *const rdsys::rd_kafka_topic_result_t,
    count: usize,
) -> Vec<TopicOutcome> {
    if array.is_null() {
        return Vec::new();
    }
    (0..count)
        .map(|i| {
            let result = *array.add(i);
            let name = text(rdsys::rd_kafka_topic_result_name(result)).unwrap_or_default();
            let err = rdsys::rd_kafka_topic_result_error(result);
            if err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                Ok(name)
            } else {
                let message = text(rdsys::rd_kafka_topic_result_error_string(result));
                Err(with_topic(error_line(err, message), &name))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_use_the_cluster_message_and_name_the_topic_once() {
        let exists = rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS;
        assert_eq!(
            with_topic(
                error_line(exists, Some("Topic 'x' already exists.".into())),
                "x"
            ),
            "TOPIC_ALREADY_EXISTS: Topic 'x' already exists."
        );
        assert_eq!(
            with_topic(error_line(exists, None), "x"),
            "TOPIC_ALREADY_EXISTS: Topic already exists (topic 'x')"
        );
        assert_eq!(
            with_topic(
                error_line(exists, Some("Broker: Topic already exists".into())),
                "x"
            ),
            "TOPIC_ALREADY_EXISTS: Topic already exists (topic 'x')"
        );
    }
}
