#!/usr/bin/env bash
# Set up everything cpr_d2 needs, from a fresh clone, with one command:
#
#     bash tools/setup_env.sh
#
# Steps (each one is skipped when it is already done, so a re-run takes seconds):
#   1. create the virtual environment (.venv in the repository root);
#   2. install the pinned requirements (requirements.txt, then
#      requirements-nodeps.txt with --no-deps);
#   3. build and install detectron2 0.6 (CPU only) from the PyPI sdist
#      pb1-detectron2==0.6, unless a detectron2 with its _C module is already
#      importable (e.g. a full build from source, which is then kept);
#   4. build and install this project (editable, with its C++/CUDA op);
#   5. print the environment summary (python -m cpr_d2.collect_env).
#
# Environment variables:
#   CPR_D2_VENV           virtual environment path (default: <repo>/.venv)
#   PYTHON                interpreter used to create the venv (default: python3)
#   CPR_D2_REBUILD=1      rebuild/reinstall the project (step 4) even if up to date
#   CPR_D2_NO_CUDA=1      build the project without its CUDA kernels
#   FORCE_CUDA=1          build the CUDA kernels even when no GPU is visible
#   TORCH_CUDA_ARCH_LIST  CUDA architectures to compile for (e.g. "9.0")
#   CUDA_HOME             CUDA toolkit; defaults to /usr/local/cuda when
#                         /usr/local/cuda/bin/nvcc exists
# FORCE_CUDA, CPR_D2_NO_CUDA and TORCH_CUDA_ARCH_LIST are passed to the project
# build (step 4) unchanged; the detectron2 build (step 3) is always CPU only.
set -euo pipefail

START_SECONDS=$SECONDS

log_step() { printf '\n==> [%s/5] %s\n' "$1" "$2"; }
info() { printf '    %s\n' "$*"; }
die() {
    printf '\nsetup_env.sh: ERROR: %s\n' "$*" >&2
    exit 1
}
elapsed() { printf '%ss' "$((SECONDS - $1))"; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

VENV="${CPR_D2_VENV:-$REPO_ROOT/.venv}"
case "$VENV" in
/*) ;;
*) VENV="$PWD/$VENV" ;;
esac
VPY="$VENV/bin/python"

BUILD_ROOT="$REPO_ROOT/.build"
D2_SPEC="pb1-detectron2==0.6"
D2_SDIST_NAME="pb1-detectron2-0.6.tar.gz"
D2_STUB="$REPO_ROOT/tools/detectron2_stub/vision.cpp"

REQ_FILE="$REPO_ROOT/requirements.txt"
REQ_NODEPS_FILE="$REPO_ROOT/requirements-nodeps.txt"
REQ_STAMP="$VENV/.cpr_d2-requirements.sha256"
BUILD_STAMP="$VENV/.cpr_d2-build.env"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_PROGRESS_BAR=off

cd "$REPO_ROOT"

# Run the venv's python from a neutral directory, so that folders in the
# repository (cpr_d2/, .build/...) do not shadow what is installed.
vpy() { (cd / && "$VPY" "$@"); }

printf 'cpr_d2 environment setup\n'
info "repository: $REPO_ROOT"
info "venv:       $VENV"

# ---------------------------------------------------------------------------
log_step 1 "Virtual environment"
t=$SECONDS
if [ -x "$VPY" ] && "$VPY" -c 'pass' 2>/dev/null; then
    info "exists, keeping it"
else
    base_python="${PYTHON:-python3}"
    command -v "$base_python" >/dev/null 2>&1 || die "'$base_python' not found (set PYTHON to a Python 3.11 interpreter)"
    info "creating it with $base_python ($("$base_python" --version 2>&1))"
    "$base_python" -m venv "$VENV"
fi
info "$("$VPY" --version 2>&1), $("$VPY" -m pip --version | cut -d' ' -f1-2)"
pip_major="$("$VPY" -c 'import pip; print(pip.__version__.split(".")[0])')"
if [ "$pip_major" -ge 25 ]; then
    info "WARNING: pip $pip_major.x in the venv; pip 26.x refuses the detectron2 sdist (keep pip <= 24.x)"
fi
info "done ($(elapsed "$t"))"

# ---------------------------------------------------------------------------
log_step 2 "Pinned requirements"
t=$SECONDS
[ -f "$REQ_FILE" ] || die "missing $REQ_FILE"
req_inputs=("$REQ_FILE")
[ -f "$REQ_NODEPS_FILE" ] && req_inputs+=("$REQ_NODEPS_FILE")
req_hash="$(cat "${req_inputs[@]}" | sha256sum | cut -d' ' -f1)"
if [ -f "$REQ_STAMP" ] && [ "$(cat "$REQ_STAMP")" = "$req_hash" ]; then
    info "already installed (requirements unchanged since the last install)"
else
    rm -f "$REQ_STAMP"
    info "pip install -r requirements.txt"
    "$VPY" -m pip install -r "$REQ_FILE"
    if [ -f "$REQ_NODEPS_FILE" ]; then
        info "pip install --no-deps -r requirements-nodeps.txt"
        "$VPY" -m pip install --no-deps -r "$REQ_NODEPS_FILE"
    fi
    printf '%s\n' "$req_hash" >"$REQ_STAMP"
fi
info "done ($(elapsed "$t"))"

# ---------------------------------------------------------------------------
log_step 3 "detectron2"
t=$SECONDS
d2_where='import os, detectron2; print(detectron2.__version__, "@", os.path.dirname(detectron2.__file__))'
if d2_info="$(vpy -c "import detectron2.layers, detectron2._C; $d2_where" 2>/dev/null)"; then
    info "already importable, keeping it: $d2_info"
else
    d2_dir="$BUILD_ROOT/detectron2"
    d2_src="$d2_dir/src"
    mkdir -p "$d2_dir"
    if [ -f "$d2_dir/$D2_SDIST_NAME" ] && tar -tzf "$d2_dir/$D2_SDIST_NAME" >/dev/null 2>&1; then
        info "using the downloaded sdist $d2_dir/$D2_SDIST_NAME"
    else
        rm -f "$d2_dir/$D2_SDIST_NAME"
        info "downloading the sdist $D2_SPEC"
        # torch must already be installed: the sdist's setup.py imports it.
        "$VPY" -m pip download --no-deps --no-build-isolation --no-binary :all: "$D2_SPEC" -d "$d2_dir"
    fi
    [ -f "$d2_dir/$D2_SDIST_NAME" ] || die "expected $d2_dir/$D2_SDIST_NAME after the download"

    info "unpacking into $d2_src"
    rm -rf "$d2_src"
    mkdir -p "$d2_src"
    tar -xzf "$d2_dir/$D2_SDIST_NAME" -C "$d2_src" --strip-components=1

    # The sdist has no detectron2/layers/csrc: add the small build-info module.
    csrc="$d2_src/detectron2/layers/csrc"
    if [ -f "$csrc/vision.cpp" ]; then
        info "the sdist has its own detectron2/layers/csrc/vision.cpp; building it"
    else
        [ -f "$D2_STUB" ] || die "missing $D2_STUB"
        mkdir -p "$csrc"
        cp "$D2_STUB" "$csrc/vision.cpp"
        info "added detectron2/layers/csrc/vision.cpp (build info only; no compiled detectron2 ops)"
    fi

    # CPU-only build: detectron2's setup.py builds CUDA when FORCE_CUDA=1, or
    # when torch.cuda.is_available() and CUDA_HOME is set. FORCE_CUDA=0 and an
    # empty CUDA_VISIBLE_DEVICES rule out both.
    info "building and installing (CPU only; about a minute)"
    (
        cd "$d2_src"
        env -u TORCH_CUDA_ARCH_LIST FORCE_CUDA=0 CUDA_VISIBLE_DEVICES= \
            "$VPY" -m pip install --no-build-isolation --no-deps .
    )
    vpy -c 'import detectron2.layers, detectron2.modeling, detectron2._C' ||
        die "detectron2 was built but 'import detectron2.layers, detectron2.modeling' fails"
    info "installed: $(vpy -c "$d2_where")"
fi
info "done ($(elapsed "$t"))"

# ---------------------------------------------------------------------------
log_step 4 "cpr_d2 (editable install, compiled op)"
t=$SECONDS
if [ ! -f "$REPO_ROOT/setup.py" ]; then
    info "no setup.py in $REPO_ROOT: nothing to install"
else
    if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
        # Unset, torch derives CUDA_HOME from the nvcc on PATH
        # (/usr/local/bin/nvcc -> /usr/local) and the link fails with
        # "cannot find -lcudart".
        export CUDA_HOME=/usr/local/cuda
    fi
    info "CUDA_HOME=${CUDA_HOME:-<unset>} FORCE_CUDA=${FORCE_CUDA:-<unset>} CPR_D2_NO_CUDA=${CPR_D2_NO_CUDA:-<unset>} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<unset>}"
    if nvcc_path="$(command -v nvcc 2>/dev/null)" || { [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && nvcc_path="$CUDA_HOME/bin/nvcc"; }; then
        info "nvcc: $nvcc_path"
    else
        info "nvcc: not found (CPU-only build unless setup.py decides otherwise)"
    fi

    # What the installed build depends on besides the sources: the build
    # options, the requirements (torch version) and this checkout.
    build_env="$(printf 'repo=%s\nrequirements=%s\nCUDA_HOME=%s\nFORCE_CUDA=%s\nCPR_D2_NO_CUDA=%s\nTORCH_CUDA_ARCH_LIST=%s\n' \
        "$REPO_ROOT" "$req_hash" "${CUDA_HOME:-}" "${FORCE_CUDA:-}" "${CPR_D2_NO_CUDA:-}" "${TORCH_CUDA_ARCH_LIST:-}")"

    reason=""
    shopt -s nullglob
    so_files=("$REPO_ROOT"/cpr_d2/_C*.so)
    shopt -u nullglob
    build_inputs=("$REPO_ROOT/setup.py")
    for f in pyproject.toml setup.cfg; do
        [ -f "$REPO_ROOT/$f" ] && build_inputs+=("$REPO_ROOT/$f")
    done
    [ -d "$REPO_ROOT/csrc" ] && build_inputs+=("$REPO_ROOT/csrc")
    if [ "${CPR_D2_REBUILD:-0}" = "1" ]; then
        reason="CPR_D2_REBUILD=1"
    elif [ "${#so_files[@]}" -eq 0 ]; then
        reason="cpr_d2/_C*.so not built yet"
    elif [ ! -f "$BUILD_STAMP" ] || [ "$(cat "$BUILD_STAMP")" != "$build_env" ]; then
        reason="build options, requirements or checkout changed since the last build"
    else
        for so in "${so_files[@]}"; do
            newer="$(find "${build_inputs[@]}" -type f -newer "$so" -print -quit)"
            if [ -n "$newer" ]; then
                reason="${newer#"$REPO_ROOT"/} is newer than ${so#"$REPO_ROOT"/}"
                break
            fi
        done
    fi
    check_installed='
import os, sys
import torch  # noqa: F401  (loads the libraries _C links against)
import cpr_d2._C
root = os.path.realpath(sys.argv[1]) + os.sep
sys.exit(0 if os.path.realpath(cpr_d2._C.__file__).startswith(root) else 3)
'
    if [ -z "$reason" ] && ! vpy -c "$check_installed" "$REPO_ROOT" >/dev/null 2>&1; then
        reason="cpr_d2 (from this checkout) is not installed in the venv"
    fi

    if [ -z "$reason" ]; then
        info "up to date (cpr_d2/_C is newer than setup.py and csrc/, and installed); CPR_D2_REBUILD=1 forces a rebuild"
    else
        info "building: $reason"
        rm -f "$BUILD_STAMP"
        "$VPY" -m pip install --no-build-isolation --no-deps -e "$REPO_ROOT"
        vpy -c "$check_installed" "$REPO_ROOT" ||
            die "cpr_d2 was installed but 'import cpr_d2._C' does not load this checkout's build"
        # Mark the in-place library as current even when the build system
        # found nothing to recompile, so the next run skips this step.
        shopt -s nullglob
        for so in "$REPO_ROOT"/cpr_d2/_C*.so; do touch "$so"; done
        shopt -u nullglob
        printf '%s\n' "$build_env" >"$BUILD_STAMP"
    fi
fi
info "done ($(elapsed "$t"))"

# ---------------------------------------------------------------------------
log_step 5 "Environment summary"
if vpy -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("cpr_d2.collect_env") else 1)' >/dev/null 2>&1; then
    vpy -m cpr_d2.collect_env
else
    info "cpr_d2.collect_env is not available; skipped"
fi

printf '\nSetup finished in %ss. Use %s (or: source %s/bin/activate).\n' \
    "$((SECONDS - START_SECONDS))" "$VPY" "$VENV"
