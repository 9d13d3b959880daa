"""The image's HEALTHCHECK: exit 0 when the readiness route answers 200 (no curl in a slim image)."""

import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('MODRET_PORT', '8000')}/v2/health/ready"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as e:  # not listening yet, 503 while loading or draining
    print(f"not ready: {e}", file=sys.stderr)
    sys.exit(1)
