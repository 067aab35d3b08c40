#!/usr/bin/env bash
# The GPU check (docs/performance.md): the step benchmark at the paper's shapes, the host-sync
# check of every algorithm, 200 GAQAT steps through `gaqat train` stopped by SIGTERM and
# resumed, the CUDA tests; one JSON of every figure. Under 8 minutes on one CUDA GPU.
#
#   scripts/gpu_check.sh OUTPUT.json                      # a bare CUDA machine (see below)
#   scripts/gpu_check.sh --cpu --python PYTHON OUTPUT.json  # tiny sizes on the CPU (the tests)
#
# Without --python it sets up the machine's own `python3` (which must hold PyTorch and
# torchvision, as the device machine's image does) from what travels with the working tree:
# .gpu_check/ (made here by scripts/gpu_check_prepare.sh: DomainBed at the pinned commit and
# the wheels the image lacks). It installs the wheels into that environment and writes one .pth
# file into its site-packages: the repository and DomainBed on the path, then the plugin's
# start-up hook (as `make setup` does). With --python it uses that environment as it is.
set -euo pipefail
command="scripts/gpu_check.sh $*"
mode=gpu
py=
while [ $# -gt 1 ]; do
  case "$1" in
    --cpu) mode=cpu; shift ;;
    --python) py=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: $0 [--cpu] [--python PYTHON] OUTPUT.json" >&2; exit 2; }
out=$1
[ ! -e "$out" ] || { echo "error: $out exists: remove it or choose another path" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)

if [ -z "$py" ]; then
  py=python3
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
  "$py" -c 'import domainbed, domainbed_gaqat, torch; print("DomainBed", domainbed.__file__,
"| torch", torch.__version__, "| CUDA", torch.version.cuda, torch.cuda.is_available())'
fi
export PYTHONUNBUFFERED=1
exec "$py" "$root/scripts/gpu_check.py" "$out" --mode "$mode" --command "$command"
