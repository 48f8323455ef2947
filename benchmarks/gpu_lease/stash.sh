# On the GPU machine: install the carried wheels (first call) and keep each carried model chunk in
# /tmp/m, which outlives the call while the machine stays warm; `ready` once the last has come.
mkdir -p /tmp/m /tmp/site
if [ -d .dev/whl ] && [ ! -f /tmp/site/.wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/whl/*.whl && touch /tmp/site/.wheels
fi
for chunk in .dev/m/m*; do [ -e "$chunk" ] && mv "$chunk" /tmp/m/; done
[ "$(ls /tmp/m/m* 2>/dev/null | wc -l)" = "${1:-0}" ] && touch /tmp/m/ready
ls /tmp/m
