#!/usr/bin/env bash
# The soak (see examples/soak.rs): SECONDS of mixed traffic (default 1800)
# through the release CLI with faults every few seconds; prints a JSON
# summary and exits non-zero if a byte came back wrong.
#
#   examples/soak.sh            # 30 minutes
#   examples/soak.sh 300        # 5 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-1800}
cargo build --release --bin zlayer-tunnel --example soak
exec target/release/examples/soak target/release/zlayer-tunnel "$seconds"
