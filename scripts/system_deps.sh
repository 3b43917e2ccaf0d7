#!/usr/bin/env bash
# Installs the Debian packages the test suite's real services need, when they are missing:
# Java 17 + Maven (the Kafka broker is assembled from Maven Central jars) and kcat (an independent
# Kafka client for interop tests). Needs root (or sudo) only when something is missing.
set -euo pipefail

need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v kcat >/dev/null || need+=(kcat)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing Debian packages: ${need[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
