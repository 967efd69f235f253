#!/usr/bin/env bash
# Makes a private CA, a server certificate and agent certificates with the
# openssl command line, for TLS and mutual TLS (the README's Security
# section runs these same commands). Usage:
#   scripts/make-certs.sh DIR SERVER-NAME [AGENT-ID...]
# writes DIR/ca.pem, DIR/ca.key, DIR/server.pem, DIR/server.key and, for each
# agent, DIR/<id>.pem and DIR/<id>.key (the certificate's CN is the agent id).
# Keep ca.key offline; private keys are written with mode 600.
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: $0 DIR SERVER-NAME [AGENT-ID...]" >&2
    exit 2
fi
dir=$1 server=$2
shift 2
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
cd "$dir"
umask 077
# The server name goes in a SAN: as an IP address if it is one, else as a DNS name.
if [[ $server =~ ^[0-9.]+$ || $server == *:* ]]; then san="IP:$server"; else san="DNS:$server"; fi

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=contact CA" -keyout ca.key -out ca.pem 2>/dev/null

openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$server" -keyout server.key -out server.csr 2>/dev/null
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
    -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san") \
    -out server.pem 2>/dev/null

for id in "$@"; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=$id" -keyout "$id.key" -out "$id.csr" 2>/dev/null
    openssl x509 -req -in "$id.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
        -extfile <(printf 'subjectAltName=DNS:%s\nextendedKeyUsage=clientAuth\n' "$id") \
        -out "$id.pem" 2>/dev/null
done
rm -f ./*.csr ca.srl
chmod 644 ca.pem server.pem "${@/%/.pem}" 2>/dev/null || true
echo "make-certs: wrote $(ls | tr '\n' ' ')in $dir"
