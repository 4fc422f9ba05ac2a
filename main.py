"""Carvana Image Masking Challenge: fetch -> split -> train UNet1024 -> predict -> submit.csv.gz.

    python main.py                      # everything, with the settings below
    python main.py --epochs 3 --input-size 512x768 --data-dir ../shared/carvana-sample
    python main.py --help               # every setting below as a flag

Edit the settings here or override any of them on the command line. The defaults are
sized for a CPU (they finish in minutes on the demo data); for a real Kaggle run on a GPU
use e.g. --input-size 1024x1024 --width 1 --batch-size 4 --epochs 50 --workers 8.
"""

# --- data --------------------------------------------------------------------------
DATA_DIR = ""  # a Carvana-layout folder to use as is; empty = mounted Kaggle Notebook files (or CARVANA_INPUT), else Kaggle if credentials, else demo data
DATA_ROOT = "data"  # where fetched / demo data is stored
HQ = False  # use train_hq.zip / test_hq.zip instead of the normal-quality JPEGs
VALIDATION_SIZE = 0.2  # fraction of cars (not images) held out for validation (ignored with --folds)
FOLDS = 0  # K >= 2: K car-grouped folds, each trained in output/models/<run>/fold<k>, scored out of fold; 0 = one split
FOLD = "all"  # with --folds: 'all' trains every fold (prediction = their ensemble), N trains/predicts fold N only
SAMPLE_SIZE = 1.0  # fraction of train cars used (quick experiments: 0.1)
TEST_SAMPLE_SIZE = 1.0  # fraction of test images predicted (< 1 gives a non-submittable file)
SEED = 42  # split, initialisation, augmentation and demo data
DATASET = "carvana"  # carvana | oxford-pet | carla | folder (folder without --data-dir: demo cars as 3-class trimaps)
CLASSES = 1  # 1 = binary Carvana path (sigmoid, Kaggle RLE); N >= 2 = softmax, CE + Dice, palette PNG masks; other datasets default to their own N
CLASS_NAMES = ""  # comma-separated class names (default: the dataset's own)
TEST_DIR = ""  # images to predict for datasets without a test list (default: the validation images)
# --- model ---------------------------------------------------------------------------
ARCH = "unet1024"  # unet1024 | unet-original | smp: unet, linknet, fpn, unetplusplus, manet, pspnet, deeplabv3plus, ...
ENCODER = "resnet34"  # encoder of the smp networks: resnet34 (LinkNet34), vgg11 (TernausNet), mobilenet_v2, ...
ENCODER_WEIGHTS = "imagenet"  # imagenet (downloaded once, needs network) | none | PATH of an encoder state-dict file
INPUT_SIZE = "128x192"  # HxW images are resized to: multiples of 64 (unet1024; 1280x1920 = native, padded not resized), 32 (smp); unet-original: the OUTPUT size, 4 + a multiple of 16 (388x388)
FAST_DECODE = True  # decode JPEGs at the largest DCT scale (1/2, 1/4, 1/8) still covering the input (bench/decode.py); pixels differ from a full decode by ~0.4-1.0 of 255 on average; off = full decode
CROP = ""  # train on random HxW crops of the input-size image (native 1280x1920: of the full frame); "" = whole
WIDTH = 0.25  # channel multiplier of unet1024 / unet-original (1.0 = the ~31M-parameter original)
# --- training --------------------------------------------------------------------------
TRAIN = True  # --no-train predicts from --checkpoint (or the run's best.pt)
EPOCHS = 32  # passes over the training set; the cosine LR schedule spans them all (32: the demo run in ~100 s on 2 CPU cores)
TIME_BUDGET = 0.0  # minutes of training per session (0 = off): stops mid-epoch when spent, then validates; cosine LR follows the clock
FREEZE_ENCODER_EPOCHS = 0  # keep the pretrained encoder frozen (weights and BatchNorm) for the first N epochs
BATCH_SIZE = 4  # per process (under torchrun the global batch is this x world size)
LR = 2e-3  # peak learning rate
OPTIMIZER = "adamw"  # adamw | adam | sgd
WEIGHT_DECAY = 1e-4  # L2 penalty (decoupled for adamw)
SCHEDULER = "cosine"  # cosine | plateau | none
BCE_WEIGHT = 1.0  # loss = BCE_WEIGHT * BCE + DICE_WEIGHT * (1 - soft Dice per image)
DICE_WEIGHT = 1.0  # weight of the soft-Dice term (see BCE_WEIGHT)
CE_WEIGHT = 1.0  # multi-class loss = CE_WEIGHT * cross-entropy + DICE_WEIGHT * (1 - soft Dice over present classes)
CLASS_WEIGHTS = ""  # comma-separated cross-entropy weight per class (multi-class); empty = equal
BOUNDARY_WEIGHT = 1.0  # BCE weight (up to) on a band around the true mask's edge; 1 = off (see README A/B)
BOUNDARY_BAND = 2  # half-width of that band in network-input pixels
BOUNDARY_DICE = False  # weight the band's pixels in the Dice term too
GRAD_CLIP = 0.0  # max gradient norm; 0 = off
EMA = 0.0  # decay of an exponential moving average of the weights and BatchNorm statistics (e.g. 0.998); validation, best.pt and prediction use the average; 0 = off
LOVASZ = 0.0  # binary: the last fraction of training (of --epochs, or of the --time-budget clock) fine-tunes with the Lovasz hinge loss instead of BCE + Dice; 0 = off
COARSE_SIZE = ""  # progressive resizing: the first --coarse-share of training steps on batches scaled down to HxW (cheaper steps, so more of them); "" = off
COARSE_SHARE = 0.0  # that share: of --epochs, or of the --time-budget clock; the rest trains at --input-size
VALIDATE_FROM = 0.0  # validate only once this share of training is done (of --epochs, or of the --time-budget clock), and always its last epoch; the epochs before only train (more of them in the same minutes) and best.pt is chosen among the validated ones; 0 = every epoch
REFIT = False  # with --folds K: once the folds are scored (threshold chosen on OOF), train one model on every car (output/models/<run>/refit) and predict with it
REFIT_BUDGET = 0.0  # minutes of training for --refit (0 = the folds' --time-budget, or their --epochs without one)
REFIT_WARM = False  # --refit starts from the weights of the fold with the best OOF Dice instead of from scratch (a fine-tune on every car)
REFIT_LR = 0.0  # the refit's peak learning rate (0 = --lr); a warm refit fine-tunes best below the folds' own
REFIT_PSEUDO = False  # the refit also trains on the --unlabeled (test) images, labeled by the folds (transductive, as Kaggle teams did); --pseudo-* shape it
# --- pseudo-labels / distillation (docs/pseudo-labels.md) ------------------------------
TEACHER = ""  # checkpoints or run folders (as --ensemble): their predictions on unlabeled images become extra training targets
UNLABELED = "test"  # images the teacher labels: test (the data set's test images), a FOLDER of photos, or test,FOLDER
PSEUDO_TARGETS = "soft"  # soft: BCE and Dice against the teacher's probabilities | hard: its masks (thresholded at 0.5)
PSEUDO_SHARE = 0.5  # share of each training batch that is pseudo-labeled; an epoch is still one pass over the labeled images
PSEUDO_MAX_UNCERTAIN = 1.0  # leave out images with more than this fraction of uncertain pixels (0.1 < p < 0.9); 1 = keep all (labels.csv lists each image's)
PSEUDO_ROUNDS = 1  # R > 1: R-1 students train first (runs <run>-round<k>), each the next round's teacher; each round resumes
AUGMENT = True  # Affine + horizontal flip + HSV jitter on training images
WORKERS = 2  # DataLoader worker processes
DEVICE = "auto"  # auto | cpu | cuda | cuda:1
AMP = True  # mixed precision: bf16 (else fp16) on CUDA, bf16 on CPUs with native bf16 (AMX/AVX512-BF16); off = fp32
ENGINE = "auto"  # CPU prediction (test set, ensembles, OOF, teacher labels): auto | torch | openvino | onnxruntime; auto = OpenVINO where installed (measured fastest, bench/engine.py), CUDA: torch
EVAL_STREAMS = 0  # CPU validation and prediction: batches run at once, one thread each (0 = one per core, up to 4; measured ~1.4x on 2 cores); CUDA: 1
CHANNELS_LAST = True  # channels_last memory format: CUDA, and CPU inference (measured faster; CPU training stays NCHW, measured slower)
COMPILE = False  # torch.compile the network (inductor): CUDA training and eval; CPU: the training step (bench/train_speed.py), compiled in the first minutes of training
SYNC_BATCHNORM = False  # SyncBatchNorm under torchrun (small per-GPU batches)
DIST_TIMEOUT = 1800.0  # seconds a torchrun process waits at a collective for a hung peer before failing
RUN_NAME = ""  # run name for output/models/<run> and logs/<run>; empty = a timestamp
RESUME = False  # continue the run (--run-name, else the latest) from last.pt; prediction resumes too
KEEP_LAST = True  # keep last.pt when training ends (--no-keep-last: only best.pt stays, e.g. for a Kaggle Notebook's Output tab; no --resume then)
CHECKPOINT = ""  # weights to predict with when --no-train (default: the run's best.pt)
# --- prediction / submission ---------------------------------------------------------
THRESHOLD = "0.5"  # probability above which a pixel is car; 'auto' = best of 0.30..0.70 on OOF Dice (needs --folds)
TTA = True  # average with the horizontally flipped prediction
TTA_SIZES = ""  # multi-scale TTA: other data sizes (HxW, comma separated) each model also predicts at, averaged in; OOF scoring and the threshold use them too; "" = the model's own size only
INT8 = False  # CPU engines: predict with an int8 model (NNCF post-training quantization calibrated on training images); refused when validation Dice drops by more than --int8-max-drop
INT8_MAX_DROP = 0.0005  # largest validation Dice drop --int8 accepts against the same engine in fp32/bf16
ENSEMBLE = ""  # checkpoints or run folders (= their fold models), space/comma separated: predict with their average
ENSEMBLE_WEIGHTS = ""  # one weight per ensemble member (normalised); "" = equal
PREDICT_BATCH_SIZE = 8  # images per forward pass when predicting the test set
CHUNK_SIZE = 256  # images per gzip member of submit.csv.gz (the resume granularity)
POSTPROCESS_WORKERS = 2  # threads that upsample, threshold and RLE-encode predictions
OUTPUT = "output/submit.csv.gz"  # the submission file (gzip CSV: img,rle_mask)
SUBMIT = False  # upload to Kaggle after validation passes
MESSAGE = "UNet1024 via carvana pipeline"  # Kaggle submission message
PREDICT = True  # --no-predict: stop after training (and out-of-fold scoring): no test predictions, no submission
# --- tuning (Optuna; docs/tuning.md) ---------------------------------------------------
TUNE = 0  # N > 0: search the settings not given explicitly until the study holds N finished trials (each a --no-predict run)
STUDY = "tune"  # study name: logs/<study>/ (trials.csv, plots, best.toml, study.db); trials run as <study>-t<number>
TUNE_STORAGE = ""  # "" = sqlite:///logs/<study>/study.db | postgresql://USER:PASSWORD@HOST/DB (many machines) | journal:FILE (shared filesystem)
TUNE_SPACE = ""  # a TOML search space (configs/spaces/*.toml); "" = the default space of the task
TUNE_PRUNER = "median"  # median | hyperband | none: stops trials whose per-epoch figure is clearly worse
TUNE_TIMEOUT = 0.0  # minutes after which this worker starts no new trial (0 = off)
TUNE_HEARTBEAT = 30  # seconds between a worker's heartbeats; a trial silent for 3x this is marked failed and retried

import sys  # noqa: E402  (settings first, nanoGPT-style, so they are the first thing read)
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works without `pip install -e .` too

from carvana.pipeline import finish, main  # noqa: E402
from carvana.pipeline.settings import settings_from  # noqa: E402

if __name__ == "__main__":
    sys.exit(finish(main(settings_from(globals()), Path(__file__).read_text(), __doc__)))
