"""`kobattr info`: versions, available backends and compiled extensions."""

import torch


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    import platform

    import transformers

    from ..backends import availability

    print(f"kobattr {__import__('kobattr').__version__}  python {platform.python_version()}  torch {torch.__version__}"
          f"  transformers {transformers.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print("backends:")
    for name, reason in availability().items():
        print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    try:
        from ..build_info import extension_report

        print("compiled extensions:")
        for name, info in extension_report().items():
            state = f"built for {', '.join(info.get('archs') or ['this CPU'])}" if info.get("built") else f"not built: {info.get('reason')}"
            print(f"  {name:<7} {state}")
    except ImportError:
        pass
    from ..models import SUPPORTED_FAMILIES

    print(f"model families: {', '.join(SUPPORTED_FAMILIES)}")
    return 0
