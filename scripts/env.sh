# Sourced by scripts/setup and scripts/test: Debian packages and the virtual environment.
#
#   apt_install PKG...   install the Debian packages given (apt-get update first; sudo only
#                        when not root); nothing to do when the list is empty
#   use_venv             create .venv in the checkout when missing and put it first on PATH,
#                        so that python3, pip and the nodeclient commands are its own: a
#                        system Python that is "externally managed" (PEP 668, Debian's)
#                        refuses pip installs, and a checkout's packages stay its own
apt_install() {
  [ $# -gt 0 ] || return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "$@"
}

use_venv() {
  if [ ! -x .venv/bin/python3 ]; then
    # Debian's python3 makes virtual environments only with python3-venv (ensurepip).
    python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
    python3 -m venv .venv
  fi
  export VIRTUAL_ENV="$PWD/.venv"
  export PATH="$VIRTUAL_ENV/bin:$PATH"
  hash -r
}
