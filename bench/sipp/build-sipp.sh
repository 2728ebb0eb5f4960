#!/bin/sh
# Build SIPp with TLS for bench/cluster.py's --generator sipp (bench/sippreg.py).
#
# Debian's sip-tester (sipp 3.6.1) has no TLS ("To use a TLS transport you
# must compile SIPp with OpenSSL"), and SIPp's TLS client (3.7.7 and master)
# sleeps 200 ms whenever the non-blocking SSL_connect wants to read, i.e. on
# every handshake: about 5 registrations a second per sipp process. The
# patch waits on the socket instead (poll, at most the same 200 ms).
#
# Usage: bench/sipp/build-sipp.sh [DIR [SOURCE]]
#   DIR     where to clone and build (default /tmp/sipp-tls)
#   SOURCE  a SIPp git repository (default https://github.com/SIPp/sipp.git)
# Needs cmake, a C++ compiler, libssl-dev and libncurses-dev. Prints the
# binary's path; give it to bench/cluster.py with --sipp PATH.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-/tmp/sipp-tls}
source=${2:-https://github.com/SIPp/sipp.git}
if [ ! -d "$dir/.git" ]; then
    git clone -q "$source" "$dir"
fi
cd "$dir"
git checkout -q v3.7.7
git checkout -q -- src/socket.cpp
git apply "$here/sipp-tls-connect-poll.patch"
cmake -S . -B build -DUSE_SSL=1 -DUSE_SCTP=0 -DUSE_PCAP=0 -DUSE_GSL=0 -DCMAKE_BUILD_TYPE=Release >/dev/null
make -C build -j"$(nproc)" sipp >/dev/null
echo "$dir/build/sipp"
