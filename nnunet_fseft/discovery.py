"""How nnU-Net finds our trainers without copying files into nnunetv2.

nnU-Net looks up `-tr NAME` in its own package, then in every folder listed in
`nnUNet_extTrainer` (os.pathsep-separated). The install puts `nnunet_fseft-trainers.pth`
into site-packages; Python runs it at start-up and it calls `register()`, which appends
our folder to that variable and keeps any folders the user listed. Where .pth files are not
run (`python -S`, some embedded or frozen installs), `nnunet-fseft env` prints the export.
"""
import os

ENV_VAR = "nnUNet_extTrainer"
# Holds one module that re-exports nnunet_fseft.trainers; nnU-Net imports the modules
# of this folder under top-level names, so the classes themselves must live elsewhere.
EXT_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext")


def listed_folders(environ=os.environ) -> list:
    return [p for p in environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]


def register(environ=os.environ) -> None:
    folders = listed_folders(environ)
    if EXT_FOLDER not in folders:
        environ[ENV_VAR] = os.pathsep.join(folders + [EXT_FOLDER])


def export_line() -> str:
    return f'export {ENV_VAR}="${{{ENV_VAR}:+${ENV_VAR}{os.pathsep}}}{EXT_FOLDER}"'
