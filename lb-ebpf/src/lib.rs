//! Empty library target: lets `lb-userspace` list this crate as a
//! build-dependency (so cargo rebuilds the object when it changes). The
//! programs are in the `lb-ebpf` binary target.
#![no_std]
