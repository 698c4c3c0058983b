import torch, sys
sys.path.insert(0,'.')
from tests.driver.test_moe import make_moe_model
from safetensors import safe_open
for fam in ("qwen3_moe","qwen2_moe","mixtral"):
    m=make_moe_model(fam); m.save_pretrained(f"/tmp/moeck_{fam}")
    with safe_open(f"/tmp/moeck_{fam}/model.safetensors","pt") as f:
        ks=[k for k in f.keys() if "layers.0." in k]; print(fam, [(k,f.get_slice(k).get_shape()) for k in ks if "mlp" in k][:8], len(ks))
