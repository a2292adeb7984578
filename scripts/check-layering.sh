#!/usr/bin/env bash
# Mechanical check of the dependency direction domain <- proto <- infra <- projections
# <- services (ARCHITECTURE.md): the pure crates must not pull in IO crates.
set -euo pipefail
forbidden='^(sqlx|sqlx-core|tokio|async-nats|axum|async-graphql|async-graphql-axum|reqwest|hyper) '
status=0
for crate in chartline-domain chartline-proto; do
  tree=$(cargo tree -p "$crate" -e normal --prefix none) || { echo "cargo tree failed for $crate" >&2; exit 1; }
  [ -n "$tree" ] || { echo "cargo tree printed nothing for $crate" >&2; exit 1; }
  found=$(printf '%s\n' "$tree" | sort -u | grep -E "$forbidden" || true)
  if [ -n "$found" ]; then
    echo "layering violation: $crate depends on IO crates:" >&2
    echo "$found" >&2
    status=1
  fi
done
# domain must not depend on any other chartline crate.
if cargo tree -p chartline-domain -e normal --prefix none | grep -qE '^chartline-(proto|infra|projections) '; then
  echo "layering violation: chartline-domain depends on a higher chartline crate" >&2
  status=1
fi
[ $status = 0 ] && echo "layering ok: domain and proto are free of IO crates"
exit $status
