#!/bin/sh
# init.sh redis|sentinel: writes this pod's config to /etc/redis (an emptyDir)
# from the ConfigMap's redis.conf or sentinel.conf, the passwords of the
# redis-auth Secret (REDIS_PASSWORD, SENTINEL_PASSWORD) and the node that is
# master now:
#   1. what another sentinel answers (after any failover, the new master);
#   2. else a data node that says it is master (the sentinels are all
#      restarting);
#   3. else the node sentinel.conf monitors: the first start, redis-0.
set -eu
role="$1"
nodes="redis-headless.${POD_NAMESPACE}.svc"
sentinels="redis-sentinel-headless.${POD_NAMESPACE}.svc"
self="$(hostname)"

master=""
for i in 0 1 2; do
  host="redis-sentinel-${i}.${sentinels}"
  [ "redis-sentinel-${i}" = "$self" ] && continue
  answer="$(REDISCLI_AUTH="$SENTINEL_PASSWORD" timeout 3 redis-cli --raw -h "$host" -p 26379 \
    sentinel get-master-addr-by-name mymaster 2>/dev/null | head -n 1)" || answer=""
  case "$answer" in
    redis-[0-9]*."$nodes") master="$answer"; break ;;
  esac
done
if [ -z "$master" ]; then
  for i in 0 1 2; do
    host="redis-${i}.${nodes}"
    [ "redis-${i}" = "$self" ] && continue
    if REDISCLI_AUTH="$REDIS_PASSWORD" timeout 3 redis-cli -h "$host" -p 6379 info replication 2>/dev/null \
        | grep -q '^role:master'; then
      master="$host"
      break
    fi
  done
fi
if [ -z "$master" ]; then
  master="$(awk '$1 == "sentinel" && $2 == "monitor" { print $4 }' /config/sentinel.conf)"
fi

case "$role" in
  redis)
    me="${self}.${nodes}"
    {
      cat /config/redis.conf
      echo "requirepass ${REDIS_PASSWORD}"
      echo "masterauth ${REDIS_PASSWORD}"
      echo "replica-announce-ip ${me}"
      if [ "$master" != "$me" ]; then echo "replicaof ${master} 6379"; fi
    } > /etc/redis/redis.conf
    ;;
  sentinel)
    # Sentinel resolves the master's name when it reads its config and
    # exits if it cannot: wait until the master answers.
    until REDISCLI_AUTH="$REDIS_PASSWORD" timeout 3 redis-cli -h "$master" -p 6379 ping 2>/dev/null \
        | grep -q PONG; do
      echo "init.sh: waiting for the master ${master}"
      sleep 2
    done
    {
      sed "s/^sentinel monitor mymaster [^ ]* /sentinel monitor mymaster ${master} /" /config/sentinel.conf
      echo "sentinel announce-ip ${self}.${sentinels}"
      echo "sentinel auth-pass mymaster ${REDIS_PASSWORD}"
      echo "sentinel sentinel-pass ${SENTINEL_PASSWORD}"
      echo "requirepass ${SENTINEL_PASSWORD}"
    } > /etc/redis/sentinel.conf
    ;;
  *)
    echo "usage: init.sh redis|sentinel" >&2
    exit 2
    ;;
esac
echo "init.sh: ${role} ${self}: master ${master}"
