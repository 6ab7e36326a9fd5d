//! Behaviour tests live in tests/tests.
