#!/usr/bin/env bash
# Clone DomainBed at the pinned commit into a cache outside the repo and make `import domainbed`
# work in the given Python environment (a .pth file in its site-packages, so subprocesses
# started by DomainBed's sweep see it too). Usage: scripts/get_domainbed.sh PYTHON
set -euo pipefail
PY=${1:?usage: get_domainbed.sh PYTHON}
COMMIT=b93c22a1cfc3b2428398272c1a116c8de1f4139e
SRC=${DOMAINBED_SRC:-https://github.com/facebookresearch/DomainBed.git}
CACHE=${DOMAINBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/domainbed-gaqat}
DEST="$CACHE/DomainBed-$COMMIT"

if [ ! -f "$DEST/domainbed/__init__.py" ]; then
  mkdir -p "$CACHE"
  tmp=$(mktemp -d "$CACHE/.clone.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  if ! git clone --quiet --no-checkout "$SRC" "$tmp/repo" ||
     ! git -C "$tmp/repo" -c advice.detachedHead=false checkout --quiet "$COMMIT"; then
    cat >&2 <<MSG
error: could not get DomainBed commit $COMMIT from DOMAINBED_SRC=$SRC
DomainBed is on no package registry. Point DOMAINBED_SRC at a clone or mirror that has this
commit, e.g.
    git clone https://github.com/facebookresearch/DomainBed ~/DomainBed
    DOMAINBED_SRC=~/DomainBed make setup
MSG
    exit 1
  fi
  rm -rf "$DEST"
  mv "$tmp/repo" "$DEST"  # atomic: a half-done clone never looks complete
fi

site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DEST" > "$site/domainbed_gaqat_domainbed_path.pth"
"$PY" -c 'import domainbed, os; print("DomainBed:", os.path.dirname(domainbed.__file__))'
