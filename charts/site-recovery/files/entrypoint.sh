#!/bin/sh
# The entrypoint of the site-recovery services in a container: `entrypoint.sh COMPONENT`, COMPONENT
# one of config-server, process-server, master-target.
#
# A process server or master target registers with the configuration server on its first start, with
# the one-time key of its pod's ordinal (a file of the mounted registration Secret), and keeps its
# certificate on its volume. With SR_REGISTER_ONLY=1 (the chart's init container, the only one that
# mounts the keys) it stops there; the service's container then finds the certificate. Every service then runs with the chart's config file; what differs from
# pod to pod (node name, advertised addresses, certificate paths, the configuration server's address)
# is given as environment overrides of that file (SR_PS__ADVERTISE sets `advertise`, and so on).
#
# Environment: POD_NAME and POD_IP (from the downward API); SR_SITE (prefix of node names, so two
# clusters never register the same name); SR_CONFIG_SERVER (host:port of the configuration server's
# API; a host name is resolved here, once); SR_ADVERTISE_IP (the address peers reach this pod at,
# default POD_IP); SR_ADVERTISE_IPS (space-separated, one per ordinal, overrides SR_ADVERTISE_IP);
# SR_SANS (extra names for the certificate); SR_PORT_QUIC, SR_PORT_HTTP, SR_PORT_NBD; SR_DATA (the
# volume, default /data); SR_CONFIG_DIR (default /etc/site-recovery/config); SR_KEYS_DIR (default
# /etc/site-recovery/registration); SR_BIN_DIR (default /usr/local/bin).
set -eu
# No word of a value is a file pattern.
set -f

component=${1:?usage: entrypoint.sh config-server|process-server|master-target}
bin=${SR_BIN_DIR:-/usr/local/bin}
config=${SR_CONFIG_DIR:-/etc/site-recovery/config}/$component.toml
data=${SR_DATA:-/data}

fail() {
  echo "entrypoint ($component): $*" >&2
  exit 1
}

# HOST:PORT, an IPv6 host in brackets.
hostport() {
  case "$1" in
    *:*) echo "[$1]:$2" ;;
    *) echo "$1:$2" ;;
  esac
}

# HOST:PORT with HOST resolved to an address (the services take addresses, not names).
resolve() {
  host=${1%:*}
  port=${1##*:}
  case "$host" in
    \[*\]) echo "$1"; return ;;
  esac
  if printf '%s' "$host" | grep -Eq '^[0-9.]+$'; then
    echo "$1"
    return
  fi
  ip=$(getent ahosts "$host" | awk 'NR == 1 { print $1 }')
  [ -n "$ip" ] || fail "cannot resolve $host, the configuration server's host (SR_CONFIG_SERVER=$1)"
  hostport "$ip" "$port"
}

if [ "$component" = config-server ]; then
  [ -f "$config" ] || fail "no config file $config"
  exec "$bin/config-server" run --config "$config"
fi

case "$component" in
  process-server) prefix=SR_PS ;;
  master-target) prefix=SR_MT ;;
  *) fail "unknown component $component: config-server, process-server or master-target" ;;
esac
pod=${POD_NAME:?POD_NAME must name the pod (downward API metadata.name)}
ordinal=${pod##*-}
node="${SR_SITE:+$SR_SITE-}$pod"
cs=$(resolve "${SR_CONFIG_SERVER:?SR_CONFIG_SERVER must give the configuration server as host:port}")

# The address peers reach this pod at: its entry in SR_ADVERTISE_IPS, else SR_ADVERTISE_IP, else POD_IP.
ip=""
i=0
for a in ${SR_ADVERTISE_IPS:-}; do
  [ "$i" = "$ordinal" ] && ip=$a
  i=$((i + 1))
done
[ -n "$ip" ] || ip=${SR_ADVERTISE_IP:-${POD_IP:?POD_IP must give the pod address (downward API status.podIP)}}
quic=$(hostport "$ip" "${SR_PORT_QUIC:?}")

certs=$data/certs
# register writes the certificate last: it is there only when the key and the CA are.
if [ ! -f "$certs/$node.pem" ]; then
  keys=${SR_KEYS_DIR:-/etc/site-recovery/registration}
  [ -d "$keys" ] || fail "$node is not registered and no registration keys are mounted at $keys (the chart's init container registers it)"
  keyfile=$keys/$component-$ordinal
  [ -f "$keyfile" ] || fail "no registration key $keyfile for pod ordinal $ordinal: raise the chart's maxReplicas, or put a key made by srctl keys create under that name in the registration Secret"
  sans=""
  for s in ${SR_SANS:-}; do sans="$sans --san $s"; done
  echo "entrypoint ($component): registering $node with the configuration server at $cs"
  # shellcheck disable=SC2086 # $sans is a list of options
  SR_REGISTRATION_KEY=$(cat "$keyfile") "$bin/$component" register --server "$cs" --name "$node" \
    --dir "$certs" --address "$quic" $sans
fi
if [ "${SR_REGISTER_ONLY:-}" = 1 ]; then
  echo "entrypoint ($component): $node is registered"
  exit 0
fi

export "${prefix}__NODE=$node" "${prefix}__ADVERTISE=$quic" "${prefix}__CONTROL__SERVER=$cs"
export "${prefix}__TLS__CA=$certs/ca.pem" "${prefix}__TLS__CERT=$certs/$node.pem" "${prefix}__TLS__KEY=$certs/$node.key"
export "${prefix}__ADVERTISE_HTTP=$(hostport "$ip" "${SR_PORT_HTTP:?}")"
if [ "$component" = master-target ]; then
  export "SR_MT__ADVERTISE_NBD=$(hostport "$ip" "${SR_PORT_NBD:?}")"
fi
exec "$bin/$component" run --config "$config"
