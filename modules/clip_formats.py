"""CLIP weights in the formats users have, read into OpenAI's state-dict layout without running any code.

- OpenAI TorchScript archives (``ViT-B-16.pt``): the archive's pickled data is read by a restricted unpickler that
  rebuilds only tensors and plain containers; TorchScript classes become inert records, so no ``__setstate__`` or
  other code in the archive ever runs. Which attributes are weights is read from the ``__parameters__`` /
  ``__buffers__`` lists of the archive's class declarations (read as text, never executed).
- ``.safetensors`` files (any layout below).
- open_clip checkpoints (OpenAI's key names, maybe under ``state_dict`` with a ``module.`` prefix).
- SegCLIP checkpoints: the CLIP inside (its text tower and all visual blocks, without the centers).
- Hugging Face ``transformers`` CLIP folders (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), or
  their state dicts: q/k/v projections joined into ``in_proj``, projections transposed.

Everything here is pure reading and key mapping; ``modules.checkpoint`` decides which reader a path needs.
"""
import json
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from common.errors import brief

from .config import heads_for_width
from .state_dict import CheckpointError

# ---------------------------------------------------------------------------------------------- TorchScript
_STORAGE_DTYPES = {
    'FloatStorage': torch.float32, 'HalfStorage': torch.float16, 'BFloat16Storage': torch.bfloat16,
    'DoubleStorage': torch.float64, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
    'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8, 'BoolStorage': torch.bool,
}


# Bounds on what an archive may unpack to, checked from the zip directory before anything is decompressed (a zip
# bomb packs gigabytes into kilobytes): the pickles and code/ declarations of a real archive are kilobytes, a
# storage holds exactly its tensor's bytes, and torch stores storages uncompressed.
MAX_ARCHIVE_RECORD = 64 << 20
MAX_COMPRESSION = 20          # unpacked : packed, for members above 1 MB


def read_member(zf: zipfile.ZipFile, name: str, source: str, limit: int) -> bytes:
    """``zf.read(name)`` once the zip directory says it unpacks to at most ``limit`` bytes, at a plausible
    compression ratio; CheckpointError otherwise, before anything is decompressed. zipfile itself never returns
    more than the directory's size."""
    info = zf.getinfo(name)
    if info.file_size > limit or (info.file_size > (1 << 20)
                                  and info.file_size > MAX_COMPRESSION * max(info.compress_size, 1)):
        raise CheckpointError(f'{source}: {name} in the archive unpacks to {info.file_size:,} bytes from '
                              f'{info.compress_size:,} (at most {limit:,} belong there): a zip bomb or a damaged '
                              'file, so it is not read')
    return zf.read(name)


def is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript's ``constants.pkl`` (plain ``torch.save`` zips have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


class _ScriptObject:
    """An inert stand-in for an instance of a TorchScript class: it only records the pickled state."""
    qualname = ''
    state = None

    def __setstate__(self, state):     # what pickle's BUILD calls: keep the state, run nothing
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _identity_list(items):
    return list(items)


def _restore_type_tag(value, type_str):
    return value


_SAFE_GLOBALS = {
    ('collections', 'OrderedDict'): OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch.jit._pickle', 'build_intlist'): _identity_list,
    ('torch.jit._pickle', 'build_doublelist'): _identity_list,
    ('torch.jit._pickle', 'build_boollist'): _identity_list,
    ('torch.jit._pickle', 'build_tensorlist'): _identity_list,
    ('torch.jit._pickle', 'restore_type_tag'): _restore_type_tag,
}


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a TorchScript archive: storages from the archive, tensors, plain containers and
    inert ``_ScriptObject`` records; any other global is refused."""

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, source: str):
        import io
        super().__init__(io.BytesIO(data))
        self.zf, self.prefix, self.source = zf, prefix, source
        self.storages: Dict[str, torch.Tensor] = {}
        self.classes: Dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module.startswith('__torch__'):   # NEWOBJ makes an empty record; BUILD stores the state in it
            qualname = f'{module}.{name}'
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {'qualname': qualname})
            return self.classes[qualname]
        if module == 'torch' and name in _STORAGE_DTYPES:
            return name
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise CheckpointError(f'{self.source}: the TorchScript archive refers to {module}.{name}, which a weights '
                              'reader does not accept (only tensors and plain containers are read; nothing in the '
                              'archive is run). Re-save the weights with torch.save(model.state_dict(), path).')

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage' and pid[1] in _STORAGE_DTYPES):
            raise CheckpointError(f'{self.source}: unexpected storage record {str(pid)[:80]} in the TorchScript archive')
        _, kind, key, _location, numel = pid[:5]
        key = str(key)
        if key not in self.storages:
            name = f'{self.prefix}data/{key}'
            dtype = _STORAGE_DTYPES[kind]
            try:       # a storage holds exactly its values' bytes
                raw = bytearray(read_member(self.zf, name, self.source,
                                            int(numel) * torch.empty((), dtype=dtype).element_size()))
            except KeyError:
                raise CheckpointError(f'{self.source}: the TorchScript archive lacks {name} (truncated or partial '
                                      'download?); delete it and download it again') from None
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() < int(numel):
                raise CheckpointError(f'{self.source}: storage {key} holds {flat.numel()} values, the archive says '
                                      f'{numel} (truncated file?); delete it and download it again')
            self.storages[key] = flat
        return self.storages[key]


_CLASS_RX = re.compile(r'^class (\w+)\(Module\):\s*$', re.M)
_LIST_RX = r'^\s+{}\s*=\s*\[(.*?)\]'


def _module_declarations(zf: zipfile.ZipFile, prefix: str,
                         source: str) -> Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]]:
    """qualified class name -> (parameter names, buffer names), from the archive's ``code/`` declarations (read
    as text). ``code/__torch__/a/b.py`` declares the classes of TorchScript module ``__torch__.a.b``."""
    decls = {}
    root = f'{prefix}code/'
    for name in zf.namelist():
        if not (name.startswith(root) and name.endswith('.py')):
            continue
        module = name[len(root):-len('.py')].replace('/', '.')
        text = read_member(zf, name, source, MAX_ARCHIVE_RECORD).decode('utf-8', errors='replace')
        starts = list(_CLASS_RX.finditer(text))
        for i, m in enumerate(starts):
            body = text[m.end():starts[i + 1].start() if i + 1 < len(starts) else len(text)]
            lists = []
            for field in ('__parameters__', '__buffers__'):
                found = re.search(_LIST_RX.format(field), body, re.M)
                lists.append(tuple(re.findall(r'"([^"]+)"', found.group(1))) if found else ())
            decls[f'{module}.{m.group(1)}'] = tuple(lists)
    return decls


def read_torchscript_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A TorchScript archive -> its state dict (parameters and buffers, as ``torch.jit.load(path).state_dict()``
    would give), without running any of the archive's code."""
    source = str(path)
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
        if len(pkl) != 1:
            raise CheckpointError(f'{source}: a TorchScript archive needs one <name>/data.pkl, found {pkl[:3]}')
        prefix = pkl[0][:-len('data.pkl')]
        if prefix + 'byteorder' in zf.namelist() and \
                read_member(zf, prefix + 'byteorder', source, 64).strip() not in (b'little', b''):
            raise CheckpointError(f'{source}: a big-endian TorchScript archive; re-save it on a little-endian machine')
        decls = _module_declarations(zf, prefix, source)
        try:
            root = _ArchiveUnpickler(read_member(zf, pkl[0], source, MAX_ARCHIVE_RECORD), zf, prefix, source).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise CheckpointError(f'{source}: the TorchScript archive\'s data.pkl is damaged ({type(e).__name__}: '
                                  f'{str(e)[:120]}); delete it and download it again') from e

    out: Dict[str, torch.Tensor] = {}

    def walk(obj: _ScriptObject, prefix: str):
        if obj.qualname not in decls:
            raise CheckpointError(f'{source}: the TorchScript archive declares no module {obj.qualname} (its code/ '
                                  'folder is incomplete); the weights cannot be told from other attributes')
        if not isinstance(obj.state, Mapping):
            raise CheckpointError(f'{source}: module {obj.qualname} of the TorchScript archive keeps its state '
                                  'through its own __setstate__ code, which this reader never runs. Load it where '
                                  'you trust it and save torch.save(model.state_dict(), path) instead.')
        params, buffers = decls[obj.qualname]
        for k in params + buffers:
            v = obj.state.get(k)
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v
        for k, v in obj.state.items():
            if isinstance(v, _ScriptObject) and v.qualname in decls:
                walk(v, f'{prefix}{k}.')

    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f'{source}: the TorchScript archive holds no module (found {type(root).__name__})')
    walk(root, '')
    return out


# ---------------------------------------------------------------------------------------------- safetensors
def is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header starting with '{'."""
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b'{' and 0 < int.from_bytes(head[:8], 'little') < (1 << 32)


def read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:   # pragma: no cover - safetensors is a runtime requirement
        raise CheckpointError(f'{path} is a .safetensors file; install safetensors (pip install -r '
                              'requirements.txt)') from e
    try:
        return dict(load_file(str(path), device='cpu'))
    except Exception as e:  # noqa: BLE001 - the safetensors library reports damage with its own exception types
        raise CheckpointError(f'{path} is not a readable .safetensors file ({brief(e)}); delete it and download '
                              'it again') from e


# ---------------------------------------------------------------------------------------------- layouts
ACTIVATIONS = ('quick_gelu', 'gelu')


@dataclass
class ClipWeights:
    """OpenAI-layout CLIP tensors plus what the tensors cannot say: the MLP activation (None = unknown; OpenAI's
    own models use QuickGELU) and the layout they came in."""
    state_dict: Dict[str, torch.Tensor]
    activation: Optional[str] = None
    layout: str = 'openai'


_HF_LAYER = {
    'layer_norm1': 'ln_1', 'layer_norm2': 'ln_2', 'mlp.fc1': 'mlp.c_fc', 'mlp.fc2': 'mlp.c_proj',
    'self_attn.out_proj': 'attn.out_proj',
}
_HF_FIXED = {
    'text_model.embeddings.token_embedding.weight': 'token_embedding.weight',
    'text_model.embeddings.position_embedding.weight': 'positional_embedding',
    'text_model.final_layer_norm.weight': 'ln_final.weight', 'text_model.final_layer_norm.bias': 'ln_final.bias',
    'vision_model.embeddings.class_embedding': 'visual.class_embedding',
    'vision_model.embeddings.patch_embedding.weight': 'visual.conv1.weight',
    'vision_model.embeddings.position_embedding.weight': 'visual.positional_embedding',
    'vision_model.pre_layrnorm.weight': 'visual.ln_pre.weight', 'vision_model.pre_layrnorm.bias': 'visual.ln_pre.bias',
    'vision_model.post_layernorm.weight': 'visual.ln_post.weight',
    'vision_model.post_layernorm.bias': 'visual.ln_post.bias',
    'logit_scale': 'logit_scale',
}
_HF_LAYER_RX = re.compile(r'(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$')


def is_hf_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(('vision_model.', 'text_model.')) for k in sd)


def hf_to_openai(sd: Mapping[str, torch.Tensor], source: str = 'state dict') -> Dict[str, torch.Tensor]:
    """A ``transformers`` CLIPModel state dict -> OpenAI's names and shapes."""
    out, qkv, unknown = {}, {}, []
    for k, v in sd.items():
        if k.endswith('position_ids'):           # an index buffer of older transformers versions, not a weight
            continue
        if k in _HF_FIXED:
            out[_HF_FIXED[k]] = v
        elif k == 'visual_projection.weight':
            out['visual.proj'] = v.t().contiguous()
        elif k == 'text_projection.weight':
            out['text_projection'] = v.t().contiguous()
        elif (m := _HF_LAYER_RX.match(k)) is not None:
            tower, i, part, kind = m.groups()
            dst = f'{"visual." if tower == "vision_model" else ""}transformer.resblocks.{i}.'
            if part in ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'):
                qkv.setdefault((dst, kind), {})[part[-6]] = v
            elif part in _HF_LAYER:
                out[f'{dst}{_HF_LAYER[part]}.{kind}'] = v
            else:
                unknown.append(k)
        else:
            unknown.append(k)
    for (dst, kind), parts in qkv.items():
        if set(parts) != {'q', 'k', 'v'}:
            raise CheckpointError(f'{source}: {dst} has only the {sorted(parts)} attention projections')
        out[f'{dst}attn.in_proj_{kind}'] = torch.cat([parts['q'], parts['k'], parts['v']])
    if unknown:
        raise CheckpointError(f'{source}: Hugging Face CLIP tensors without an OpenAI counterpart: {unknown[:5]}'
                              f'{" ..." if len(unknown) > 5 else ""} (only CLIPModel ViT checkpoints are supported)')
    return out


# The config.json fields read here and the JSON types they must have (a config written by hand, or damaged, must
# give one line naming the field, not a TypeError deep in the checks).
_HF_FIELD_TYPES = {'model_type': (str,), 'hidden_size': (int,), 'num_attention_heads': (int,),
                   'layer_norm_eps': (int, float), 'hidden_act': (str,)}
_JSON_TYPE_NAMES = {(str,): 'a string', (int,): 'an integer above 0', (int, float): 'a number'}


def _check_hf_fields(c, source: str, where: str = '') -> None:
    """The fields of ``_HF_FIELD_TYPES`` present in config mapping ``c`` have their JSON type (null = absent);
    counts and widths are positive."""
    for key, kinds in _HF_FIELD_TYPES.items():
        value = c.get(key)
        if value is None:
            continue
        counted = kinds == (int,)           # sizes and head counts
        if isinstance(value, bool) or not isinstance(value, kinds) or (counted and value <= 0):
            raise CheckpointError(f'{source}: {where}{key} must be {_JSON_TYPE_NAMES[kinds]}, got '
                                  f'{json.dumps(value)[:60]}')


def hf_config_facts(config: Mapping, source: str) -> str:
    """A transformers CLIP ``config.json`` -> the activation; refuses what OpenAI's layout cannot express, and
    fields of the wrong type."""
    if not isinstance(config, dict):
        raise CheckpointError(f'{source}: expected a JSON object of settings, got {json.dumps(config)[:60]}')
    _check_hf_fields({'model_type': config.get('model_type')}, source)
    if config.get('model_type') not in (None, 'clip'):
        raise CheckpointError(f'{source}: model_type {config.get("model_type")!r} is not a CLIP model')
    acts = set()
    for tower in ('text_config', 'vision_config'):
        c = config.get(tower) or {}
        if not isinstance(c, dict):
            raise CheckpointError(f'{source}: {tower} must be an object, got {json.dumps(c)[:60]}')
        _check_hf_fields(c, source, f'{tower}.')
        width, heads = c.get('hidden_size'), c.get('num_attention_heads')
        if width and heads and heads_for_width(width) != heads:
            raise CheckpointError(f'{source}: {tower} has {heads} heads of width {width // heads}; this CLIP '
                                  'implementation uses heads of width 64 (as OpenAI CLIP), i.e. '
                                  f'{heads_for_width(width)}')
        if c.get('layer_norm_eps', 1e-5) != 1e-5:
            raise CheckpointError(f'{source}: {tower} uses layer_norm_eps {c["layer_norm_eps"]}, not 1e-5')
        acts.add(c.get('hidden_act', 'quick_gelu'))
    if len(acts) != 1 or next(iter(acts)) not in ACTIVATIONS:
        raise CheckpointError(f'{source}: unsupported activation(s) {sorted(acts)}; supported: {ACTIVATIONS}')
    return acts.pop()


def read_hf_folder(folder: Path, load_file) -> ClipWeights:
    """A transformers CLIP folder -> ClipWeights; ``load_file`` reads its weights file (safetensors or a
    weights-only torch file)."""
    config_path = folder / 'config.json'
    try:
        config = json.loads(config_path.read_text(encoding='utf-8'))
    except (OSError, ValueError, RecursionError) as e:     # RecursionError: nested deeper than Python's stack
        raise CheckpointError(f'{config_path}: not a readable JSON config ({e})') from e
    activation = hf_config_facts(config, str(config_path))
    for name in ('model.safetensors', 'pytorch_model.bin'):
        if (folder / name).is_file():
            weights = folder / name
            break
    else:
        shards = sorted(folder.glob('*.index.json'))
        raise CheckpointError(f'{folder}: a Hugging Face folder needs model.safetensors or pytorch_model.bin'
                              + (f' (sharded checkpoints such as {shards[0].name} are not supported)' if shards else ''))
    return ClipWeights(hf_to_openai(load_file(weights), str(weights)), activation, 'transformers')


def is_segclip_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith('clip.visual.transformer.layers0.') for k in sd)


def segclip_to_openai(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The CLIP inside a SegCLIP checkpoint (design.md §3 in reverse): ``clip.`` dropped, visual ``layers0.i`` /
    ``layers2.j`` renumbered into ``resblocks``; the centers, MAE blocks and decoder are left out."""
    first = 1 + max(int(m.group(1)) for k in sd
                    if (m := re.match(r'clip\.visual\.transformer\.layers0\.(\d+)\.', k)))
    out = {}
    for k, v in sd.items():
        if not k.startswith('clip.'):
            continue                        # vis_mae_decoder.*
        k = k[len('clip.'):]
        if (m := re.match(r'visual\.transformer\.layers([02])\.(\d+)\.(.*)', k)) is not None:
            i = int(m.group(2)) + (first if m.group(1) == '2' else 0)
            out[f'visual.transformer.resblocks.{i}.{m.group(3)}'] = v
        elif not k.startswith('visual.transformer.'):   # semantic_layer2, layers_mae2, reconstruct_layer2 dropped
            out[k] = v
    return out


def to_openai_layout(sd: Mapping[str, torch.Tensor], source: str = 'state dict') -> ClipWeights:
    """OpenAI / open_clip / transformers CLIP tensors, or a SegCLIP checkpoint's CLIP -> ClipWeights in OpenAI's
    layout."""
    if is_hf_layout(sd):
        return ClipWeights(hf_to_openai(sd, source), None, 'transformers')
    if is_segclip_layout(sd):
        return ClipWeights(segclip_to_openai(sd), 'quick_gelu', 'segclip')
    return ClipWeights(dict(sd), None, 'openai')
