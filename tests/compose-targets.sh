#!/usr/bin/env bash
# Runs the compose stack with `--profile targets` for real and checks what the README says of
# it: tasks of every kind (`sleep` on the built-in workers, `py-work` and `node-work` on the
# target worker), posted at the same time, all succeed, none dead. Needs Docker and compose
# (on a machine without a registry: ../shared/tools/standin-images.sh first). Not part of
# .ci/run (it builds the image, minutes); docs/TESTING.md says when to run it.
#   tests/compose-targets.sh            (TASKS=20 per kind; KEEP=1 leaves the stack up)
set -euo pipefail
cd "$(dirname "$0")/.."
compose() { docker-compose -f deploy/docker-compose.yml --profile targets "$@"; }
tasks=${TASKS:-20}
# The first key of the development secrets (all scopes).
key=$(grep -v '^#' deploy/secrets/api_keys | sed -n 's/^\([^=[:space:]]*\).*/\1/p' | head -n1)
api=http://127.0.0.1:8080
cleanup() { [ -n "${KEEP:-}" ] || compose down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

compose up -d --build --scale worker=2
deadline=$((SECONDS + 180))
until curl -fsS "$api/health" >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || { compose logs --tail 50; echo "the gateway never became healthy" >&2; exit 1; }
  sleep 1
done
# Each worker declares its kinds' queues as it starts: wait until every kind is routed.
for kind in sleep py-work node-work; do
  until curl -fsS "$api/kinds" -H "authorization: Bearer $key" | grep "\"kind\":\"$kind\"" >/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "kind $kind never appeared in GET /kinds" >&2; exit 1; }
    # A kind is listed once a task of it was routed (or a worker announced it): try one.
    curl -s -o /dev/null -X POST "$api/tasks" -H "authorization: Bearer $key" \
         -H 'content-type: application/json' -d "{\"kind\":\"$kind\",\"payload\":{\"message\":\"probe.\"}}"
    sleep 1
  done
done

ids=$(mktemp)
# The id of a task of kind $1, on a line of its own (the answer has no final newline).
post() {
  local answer
  answer=$(curl -fsS -X POST "$api/tasks" -H "authorization: Bearer $key" -H 'content-type: application/json' \
       -d "{\"kind\":\"$1\",\"payload\":{\"message\":\"task $2.\"}}")
  printf '%s\n' "$answer" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p'
}
for i in $(seq 1 "$tasks"); do
  for kind in sleep py-work node-work; do
    post "$kind" "$i" >>"$ids" &
  done
done
wait
posted=$(wc -l <"$ids")
[ "$posted" -eq $((tasks * 3)) ] || { echo "only $posted of $((tasks * 3)) tasks were accepted" >&2; exit 1; }

deadline=$((SECONDS + 300))
while read -r id; do
  while :; do
    status=$(printf '%s\n' "$(curl -fsS "$api/tasks/$id?wait=10s" -H "authorization: Bearer $key")" | sed -n 's/.*"status":"\([a-z]*\)".*/\1/p')
    case $status in
      succeeded) break ;;
      dead) curl -s "$api/tasks/$id" -H "authorization: Bearer $key"; echo; echo "task $id is dead" >&2; exit 1 ;;
    esac
    [ $SECONDS -lt $deadline ] || { echo "task $id is still $status" >&2; exit 1; }
  done
done <"$ids"
dead=$(printf '%s\n' "$(curl -fsS "$api/dead" -H "authorization: Bearer $key")" | sed -n 's/.*"total":\([0-9]*\).*/\1/p')
[ "$dead" = 0 ] || { echo "the dead-letter queue holds $dead tasks" >&2; exit 1; }
echo "compose --profile targets: $posted tasks of sleep, py-work and node-work, posted together, all succeeded; none dead"
curl -fsS "$api/kinds" -H "authorization: Bearer $key"; echo
