//! DeviceTwin (group `twin`): KubeEdge's device twin for mappers on the local MQTT broker.
//! `model` holds the data model and validation, `topics` the MQTT topic names, `rules` the
//! twin rules as plain functions, `store` the durable device store, `device_object` the newer
//! cloud's Device objects; this file is the module thread that ties them to the cloud, the
//! broker and the local API.

pub mod device_object;
pub mod model;
pub mod rules;
pub mod store;
pub mod topics;

#[cfg(test)]
mod rules_tests;
