"""The one injection loop behind every method (one module per method beside it).

A method module declares a `Method`: WHERE it goes (its sites, module names taken from
`nnunet_fseft.network.anatomy`) and WHAT it puts there (the layer each site becomes, the parameters or
branches each site gets, and, for a linear method, how its update merges into the site's own
weights). `inject` and `merge` below do the rest, the same way for every method.

Adapters are added *in place*: a module is turned into its adapted subclass and
keeps its own parameters under their own names. That matters for nnU-Net networks:
- aliases stay consistent: `ConvDropoutNormReLU.conv` is also `all_modules[0]`, and
  `PlainConvUNet.decoder.encoder` is the encoder; replacing one attribute would leave
  the old module in the forward path, adapting in place changes every alias at once;
- the foundation's state-dict keys are unchanged, so a foundation checkpoint loads
  into an adapted network and adapter parameters are recognisable by name alone.
"""
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from nnunet_fseft.errors import InputError
from nnunet_fseft.network.anatomy import Anatomy, anatomy

# Every adapter parameter name contains this token; nothing in nnU-Net's networks does.
ADAPTER_TOKEN = "fseft_"


def is_adapter_parameter(name: str) -> bool:
    return ADAPTER_TOKEN in name


@dataclass(frozen=True)
class Site:
    """One place a method adapts, as its `additions` sees it."""
    module: nn.Module
    anatomy: Optional[Anatomy]
    previous: Optional[Dict[str, Any]]  # what the previous site got (Med-Adapter chains its stages); None first


@dataclass(frozen=True)
class Method:
    # network, its anatomy -> names of the modules to adapt, in forward order; raises InputError
    # where the method does not apply to the architecture
    sites: Callable[[nn.Module, Anatomy], List[str]]
    # mixin whose forward replaces the site's (super().forward is the site's own computation)
    layer: type
    # (site, *, hyper-parameters) -> {name containing ADAPTER_TOKEN: nn.Parameter, branch module or value}
    additions: Callable[..., Dict[str, Any]]
    # merges a site's update into its own weights; None: the branches are non-linear, nothing merges
    merge: Optional[Callable[[nn.Module], None]] = None

    def __post_init__(self):
        # the trainer class is the one place a hyper-parameter's value is written (a programming error)
        with_default = [p.name for p in self._keyword_only() if p.default is not p.empty]
        if with_default:
            raise TypeError(f"{self.additions.__qualname__} gives {', '.join(with_default)} a default; "
                            f"hyper-parameters take their values from the trainer class only.")

    def _keyword_only(self) -> List[inspect.Parameter]:
        return [p for p in inspect.signature(self.additions).parameters.values() if p.kind is p.KEYWORD_ONLY]

    @property
    def name(self) -> str:
        return self.layer.__name__

    @property
    def hyperparameters(self) -> Tuple[str, ...]:
        """The keyword-only arguments of `additions` (none has a default): the trainer class sets each."""
        return tuple(p.name for p in self._keyword_only())


_ADAPTED = {}


def adapted_class(layer: type, base: type) -> type:
    """The one subclass of `base` with `layer` first in its method order (made once per pair)."""
    cls = _ADAPTED.get((layer, base))
    if cls is None:
        if issubclass(base, (nn.Sequential, nn.ModuleList)):
            # nn.Sequential runs every child it holds: an added branch would run as a layer
            raise TypeError(f"cannot add an adapter to a {base.__name__}")
        cls = type(f"{layer.__name__}{base.__name__}", (layer, base), {"__module__": layer.__module__})
        _ADAPTED[(layer, base)] = cls
    return cls


def adapt(method: Method, site: Site, **hyperparameters) -> Dict[str, Any]:
    """Turns `site.module` into the method's layer, in place, and adds what the method puts
    there; returns that (the next site's `previous`)."""
    module = site.module
    device = next(module.parameters()).device
    additions = method.additions(site, **hyperparameters)
    module.__class__ = adapted_class(method.layer, type(module))
    for key, value in additions.items():
        assert ADAPTER_TOKEN in key, key  # how adapter parameters are told from the foundation's
        if isinstance(value, nn.Parameter):
            module.register_parameter(key, value)
        elif isinstance(value, nn.Module):
            module.add_module(key, value.to(device))
        else:
            setattr(module, key, value)
    return additions


def inject(network: nn.Module, method: Method, **hyperparameters) -> List[str]:
    """Adapts every site of `method` in `network`, in forward order; returns the names of the
    modules adapted. A site the method has adapted already is left alone, so a second injection
    adds nothing."""
    a = anatomy(network)
    modules = dict(network.named_modules())  # each module object once, whatever its aliases
    names = [n for n in method.sites(network, a) if not isinstance(modules[n], method.layer)]
    previous = None
    for name in names:
        previous = adapt(method, Site(modules[name], a, previous), **hyperparameters)
    return names


def merge(network: nn.Module, method: Method) -> None:
    """Merges every site's update into its own weights; the sites become plain nnU-Net modules again."""
    if method.merge is None:
        raise InputError(f"{method.name} adds non-linear branches, which cannot be merged into plain weights; "
                         f"share the model with `nnunet-fseft export` instead, or train a linear method such as LoRA.")
    for module in [m for m in network.modules() if isinstance(m, method.layer)]:
        method.merge(module)
        module.__class__ = type(module).__bases__[-1]  # the site's own class (see adapted_class)
        for store in (module._parameters, module._modules, module._buffers, module.__dict__):
            for key in [k for k in store if ADAPTER_TOKEN in k]:
                del store[key]
