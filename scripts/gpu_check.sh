#!/usr/bin/env bash
# The GPU check (docs/performance.md): the step benchmark at the paper's shapes, the host-sync
# check of every algorithm, 200 GAQAT steps through `gaqat train` stopped by SIGTERM and
# resumed, the CUDA tests; one JSON of every figure. Under 8 minutes on one CUDA GPU.
#
#   scripts/gpu_check.sh OUTPUT.json                      # a bare CUDA machine (see below)
#   scripts/gpu_check.sh --cpu --python PYTHON OUTPUT.json  # tiny sizes on the CPU (the tests)
#
# Without --python it uses the machine's own `python3` (which must hold PyTorch and
# torchvision, as the device machine's image does); where that cannot import DomainBed and the
# plugin (a bare machine), it sets it up from what travels with the working tree: .gpu_check/
# (made here by scripts/gpu_check_prepare.sh: DomainBed at the pinned commit and the wheels the
# image lacks), installing the wheels and writing one .pth file into its site-packages (the
# repository and DomainBed on the path, then the plugin's start-up hook, as `make setup` does).
# With --python it uses that environment as it is.
set -euo pipefail
command="scripts/gpu_check.sh $*"
usage="usage: $0 [--cpu] [--python PYTHON] OUTPUT.json"
mode=gpu
py=
out=
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu; shift ;;
    --python) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; py=$2; shift 2 ;;
    -*) echo "$usage" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "$usage" >&2; exit 2; }; out=$1; shift ;;
  esac
done
[ -n "$out" ] || { echo "$usage" >&2; exit 2; }
[ ! -e "$out" ] || { echo "error: $out exists: remove it or choose another path" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)

if [ -z "$py" ]; then
  py=python3
  if (cd / && "$py" -c 'import domainbed, domainbed_gaqat' 2>/dev/null); then
    echo "$py already has DomainBed and the plugin: used as it is (nothing installed)"
  else
    carried="$root/.gpu_check"
    if [ ! -d "$carried/DomainBed/domainbed" ]; then
      echo "error: $carried/DomainBed is missing: run scripts/gpu_check_prepare.sh where the" \
           "project is set up and carry .gpu_check" >&2
      exit 2
    fi
    "$py" -m pip install -q --no-index --no-deps --no-cache-dir "$carried"/wheels/*.whl
    site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    { echo "$root"; echo "$carried/DomainBed"; cat "$root/domainbed_gaqat.pth"; } \
      > "$site/domainbed_gaqat.pth"
  fi
  (cd / && "$py" -c 'import domainbed, domainbed_gaqat, torch; print("DomainBed",
domainbed.__file__, "| plugin", domainbed_gaqat.__file__, "| torch", torch.__version__,
"| CUDA", torch.version.cuda, torch.cuda.is_available())')
fi
export PYTHONUNBUFFERED=1
exec "$py" "$root/scripts/gpu_check.py" "$out" --mode "$mode" --command "$command"
