//! Client-side helpers for talking to a weightinit server.

pub mod health;
