//! Command-line front ends of tally's subcommand groups (argument parsing, output and
//! exit codes); the work itself is in the library modules they call.

pub mod audit;
