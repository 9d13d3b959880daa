#!/bin/sh
# The container's start command. With arguments, runs them instead (`docker run IMAGE modret eval ...`).
#
# - A mounted model (MODRET_RUN_DIR holding model.safetensors): serve it over the gallery in
#   MODRET_INDEX_DIR (default /data/index/served). When that gallery does not exist yet it is built at
#   first start from the images in MODRET_GALLERY_IMAGES, or created empty (fill it with POST /images).
# - Nothing mounted: `modret demo` — trains the demo model into /data at first start (or reuses it),
#   indexes the synthetic faces and serves, exactly as on a workstation. MODRET_DEMO_STEPS,
#   MODRET_DEMO_WIDTH, MODRET_DEMO_IMAGES, MODRET_DEMO_BACKEND (faiss | milvus) and MODRET_MILVUS_URI
#   tune it.
# Every other MODRET_* variable is read by the service itself (docs/deploy.md lists them).
set -eu

if [ "$#" -gt 0 ]; then
    exec "$@"
fi

host="${MODRET_HOST:-0.0.0.0}"
port="${MODRET_PORT:-8000}"
data="${MODRET_DATA_DIR:-/data}"

if [ -n "${MODRET_RUN_DIR:-}" ] && [ -f "$MODRET_RUN_DIR/model.safetensors" ]; then
    index="${MODRET_INDEX_DIR:-$data/index/served}"
    if [ ! -f "$index/gallery.json" ]; then
        if [ -n "${MODRET_GALLERY_IMAGES:-}" ]; then
            echo "building the gallery index $index from $MODRET_GALLERY_IMAGES" >&2
            store_images="--store-images"
            case "${MODRET_INDEX_STORE_IMAGES:-true}" in
                false | False | FALSE | 0 | no) store_images="--no-store-images" ;;
            esac
            modret index build --run "$MODRET_RUN_DIR" --images "$MODRET_GALLERY_IMAGES" --out "$index" \
                --backend "${MODRET_INDEX_BACKEND:-faiss}" --kind "${MODRET_INDEX_KIND:-flat}" "$store_images"
        else
            export MODRET_CREATE_INDEX=true
        fi
    fi
    exec modret serve --run "$MODRET_RUN_DIR" --index "$index" --host "$host" --port "$port"
fi

set -- --host "$host" --port "$port" --data-dir "$data" --device "${MODRET_DEVICE:-auto}" \
    --backend "${MODRET_DEMO_BACKEND:-faiss}"
[ -n "${MODRET_DEMO_STEPS:-}" ] && set -- "$@" --steps "$MODRET_DEMO_STEPS"
[ -n "${MODRET_DEMO_WIDTH:-}" ] && set -- "$@" --width "$MODRET_DEMO_WIDTH"
[ -n "${MODRET_DEMO_IMAGES:-}" ] && set -- "$@" --num-images "$MODRET_DEMO_IMAGES"
[ -n "${MODRET_MILVUS_URI:-}" ] && set -- "$@" --milvus-uri "$MODRET_MILVUS_URI"
exec modret demo "$@"
