//! The sandbox runner's methods (DESIGN.md §4 "Execution windows").

use crate::pb;
use crate::rpc_method;

/// Internal requests: `sandbox.<method>`.
pub mod internal {
    use super::*;

    rpc_method!(
        /// Runs one execution window and answers with its outcome when it ends (at most once
        /// per execution id; asking again returns the record).
        Run: Internal "sandbox"."run",
        pb::RunRequest => pb::RunResponse
    );
    rpc_method!(
        /// An execution's run record (a run whose runner died is reported lost).
        GetRun: Internal "sandbox"."get_run",
        pb::GetRunRequest => pb::GetRunResponse
    );
}
