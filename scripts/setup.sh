#!/usr/bin/env bash
# Installs what Wharf's scripts need on a fresh Debian/Ubuntu machine: a C toolchain, the Rust
# toolchain (rustup, with rustfmt and clippy), and the given extra apt packages. Idempotent.
# Usage: scripts/setup.sh [APT_PACKAGE...]
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi

apt_packages=("$@")
command -v cc >/dev/null 2>&1 || apt_packages+=(build-essential)
command -v curl >/dev/null 2>&1 || apt_packages+=(curl ca-certificates)
command -v python3 >/dev/null 2>&1 || apt_packages+=(python3)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: installing the Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
for tool in cargo rustfmt cargo-clippy; do
  command -v "$tool" >/dev/null 2>&1 || { echo "setup: $tool is missing and could not be installed" >&2; exit 1; }
done
