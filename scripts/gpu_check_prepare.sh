#!/usr/bin/env bash
# Prepare, where the project is set up (`make setup`), what scripts/gpu_check.sh needs on a bare
# CUDA machine that has PyTorch but no network: .gpu_check/ (git-ignored; name it in the device
# call's `carry`), holding
#   DomainBed/   the pinned DomainBed package, copied from the clone `make setup` made
#   wheels/      pure-Python wheels the device image lacks: wilds and what importing it needs
#                (outdated, littleutils, pytz), submitit and parameterized (the test suite's)
# The versions are those of this environment. Usage: scripts/gpu_check_prepare.sh [PYTHON]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-$root/.venv/bin/python}
dest="$root/.gpu_check"
packages="wilds outdated littleutils pytz submitit parameterized"

src=$(cd / && "$py" -c 'import domainbed, os; print(os.path.dirname(domainbed.__file__))')
case "$src" in "$dest"/*)
  echo "error: $py imports DomainBed from $src, the folder this script replaces" >&2; exit 1 ;;
esac
pins=$("$py" -m pip freeze 2>/dev/null | grep -i -E "^($(echo $packages | tr ' ' '|'))==" )
[ "$(echo "$pins" | wc -l)" -eq "$(echo $packages | wc -w)" ] ||
  { echo "error: $py lacks some of: $packages (found: $pins)" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$dest/DomainBed" "$dest/wheels"
cp -r "$src" "$dest/DomainBed/"
find "$dest/DomainBed" -name __pycache__ -prune -exec rm -rf {} +
# shellcheck disable=SC2086
"$py" -m pip wheel -q --no-deps -w "$dest/wheels" $pins 2>&1 | grep -v '^WARNING: Location' || true
ls "$dest/wheels"/*.whl >/dev/null
du -sh "$dest"
