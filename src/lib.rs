//! edgehub: the edge half of KubeEdge's cloud–edge link (doc filled in below).

#![deny(unsafe_code)]

pub mod error;
pub mod message;

#[cfg(feature = "cloudsim")]
pub mod cloudsim;

pub use error::{Error, ErrorKind, Result};
pub use message::Message;
