#!/usr/bin/env bash
# Installs the Debian packages the test suite's real services need, when they are missing:
# Java 17 + Maven (the Kafka broker is assembled from Maven Central jars), kcat (an independent
# Kafka client for interop tests), Mosquitto (the local MQTT broker) and mosquitto-clients
# (mosquitto_pub/mosquitto_sub, independent MQTT clients), and the headless audio device (rnnstream.pulseaudio:
# PulseAudio with a null sink, PortAudio for sounddevice, the ALSA "pulse" device; sox and espeak-ng make
# test audio), and openssl (the local brokers' TLS listeners get a throwaway CA at each start). Needs root
# (or sudo) only when something is missing.
set -euo pipefail

need=()
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v kcat >/dev/null || need+=(kcat)
command -v socat >/dev/null || need+=(socat)  # pty pairs for the serial-source tests
command -v openssl >/dev/null || need+=(openssl)  # the brokers' throwaway TLS CA (rnnstream.local_tls)
# Debian installs the broker in /usr/sbin, which is not always on a non-root PATH.
command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || need+=(mosquitto)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v pulseaudio >/dev/null || need+=(pulseaudio)
command -v pactl >/dev/null && command -v parec >/dev/null || need+=(pulseaudio-utils)
installed libportaudio2 || need+=(libportaudio2)  # sounddevice loads libportaudio.so.2
installed libasound2-plugins || need+=(libasound2-plugins)  # the ALSA "pulse" device
command -v sox >/dev/null || need+=(sox)
command -v espeak-ng >/dev/null || need+=(espeak-ng)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing Debian packages: ${need[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
