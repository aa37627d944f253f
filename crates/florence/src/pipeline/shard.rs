//! Which images a machine captions when many share one input: `--shard I/N`, or `--shard auto`
//! with the index (and count) from the scheduler that started the process.

use std::path::Path;

use super::dataset::InputImage;

/// Shard `index` of `count` (0-based): the images whose [`shard_hash`] is `index` modulo
/// `count`. Shards partition any input exactly, and membership depends only on each image's
/// [`key`](InputImage::key), so machines that mount one dataset at different places agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which shard, `0..count`.
    pub index: usize,
    /// How many shards the input is split into.
    pub count: usize,
}

impl Shard {
    /// Shard `index` of `count`; the index must be below the count.
    pub fn new(index: usize, count: usize) -> Result<Self, String> {
        if count == 0 || index >= count {
            return Err(format!(
                "shard {index}/{count}: the index must be below the count (0-based)"
            ));
        }
        Ok(Self { index, count })
    }

    /// Whether `image` belongs to this shard.
    pub fn contains(&self, image: &InputImage) -> bool {
        self.contains_key(&image.key)
    }

    /// Whether the input whose key is `key` (an image's, a tar shard's, a Parquet row group's)
    /// belongs to this shard.
    pub fn contains_key(&self, key: &Path) -> bool {
        (shard_hash(key) % self.count as u64) as usize == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// Parses `I/N`, e.g. `3/8`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/4")?;
        let i: usize = i
            .trim()
            .parse()
            .map_err(|_| format!("shard index {i:?} is not a number"))?;
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("shard count {n:?} is not a number"))?;
        Self::new(i, n)
    }
}

/// The hash that assigns an image to a shard: 64-bit FNV-1a over the key's components joined
/// with `/` (on every platform), then MurmurHash3's 64-bit finalizer. FNV-1a alone leaves its low
/// bits poorly mixed (its lowest bit is the parity of the bytes' lowest bits, so with two shards
/// keys that differ in one byte land in opposite shards); the finalizer spreads every input bit
/// over every output bit.
pub fn shard_hash(key: &Path) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in key.components().enumerate() {
        let bytes = match part {
            std::path::Component::RootDir => &b""[..],
            other => other.as_os_str().as_encoded_bytes(),
        };
        let separator = if i > 0 { &b"/"[..] } else { &b""[..] };
        for b in separator.iter().chain(bytes) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    let mut x = h;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// What `--shard` asks for: a given shard, or the one the scheduler's environment names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSpec {
    /// `I/N`.
    Fixed(Shard),
    /// `auto`, or `auto/N` where the scheduler does not tell the count.
    Auto {
        /// The count given with `auto/N`.
        count: Option<usize>,
    },
}

impl std::str::FromStr for ShardSpec {
    type Err = String;

    /// Parses `I/N`, `auto` or `auto/N`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().strip_prefix("auto") {
            Some("") => Ok(Self::Auto { count: None }),
            Some(rest) => {
                let n = rest.strip_prefix('/').ok_or("expected auto or auto/N, e.g. auto/8")?;
                match n.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Ok(Self::Auto { count: Some(n) }),
                    _ => Err(format!("shard count {n:?} is not a positive number")),
                }
            }
            None => s.parse().map(Self::Fixed),
        }
    }
}

/// The variables `--shard auto` reads, in the order it looks for them.
pub const SCHEDULER_VARIABLES: &str = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (Slurm job arrays), \
     JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs, with --shard auto/N), RANK/WORLD_SIZE (torchrun, accelerate)";

impl ShardSpec {
    /// The shard, with `auto` read from `env` (the process environment: `|k| std::env::var(k).ok()`):
    /// a Slurm job array (`SLURM_ARRAY_TASK_ID` less `SLURM_ARRAY_TASK_MIN`, over
    /// `SLURM_ARRAY_TASK_STEP`, of `SLURM_ARRAY_TASK_COUNT`), a Kubernetes Indexed Job
    /// (`JOB_COMPLETION_INDEX` of the `N` in `auto/N`), or torchrun and accelerate (`RANK` of
    /// `WORLD_SIZE`). A count given with `auto/N` must agree with the scheduler's.
    pub fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> Result<Shard, String> {
        let given = match *self {
            Self::Fixed(shard) => return Ok(shard),
            Self::Auto { count } => count,
        };
        let number = |name: &str| -> Result<Option<usize>, String> {
            match env(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("--shard auto: {name}={v:?} is not a number")),
            }
        };
        let (index, count, source) = if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
            let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let count = number("SLURM_ARRAY_TASK_COUNT")?;
            let offset = id
                .checked_sub(min)
                .ok_or_else(|| format!("--shard auto: SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}"))?;
            (offset / step, count, "SLURM_ARRAY_TASK_COUNT")
        } else if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            (index, None, "the Job's completions")
        } else if let Some(rank) = number("RANK")? {
            (rank, number("WORLD_SIZE")?, "WORLD_SIZE")
        } else {
            return Err(format!(
                "--shard auto found no scheduler's variables; it reads {SCHEDULER_VARIABLES}; or pass --shard I/N"
            ));
        };
        let count = match (given, count) {
            (Some(n), Some(m)) if n != m => {
                return Err(format!("--shard auto/{n}: the scheduler says there are {m} shards ({source})"))
            }
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => {
                return Err(format!(
                    "--shard auto: the scheduler does not say how many shards there are; pass --shard auto/N with N = {source}"
                ))
            }
        };
        Shard::new(index, count).map_err(|e| format!("--shard auto: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn image(key: &str) -> InputImage {
        InputImage {
            path: PathBuf::from(key),
            root: PathBuf::new(),
            key: PathBuf::from(key),
        }
    }

    #[test]
    fn shards_partition_exactly() {
        let images: Vec<InputImage> = (0..500).map(|i| image(&format!("d/img_{i}.jpg"))).collect();
        for n in [1, 2, 3, 7] {
            for img in &images {
                let owners = (0..n).filter(|&i| Shard::new(i, n).unwrap().contains(img)).count();
                assert_eq!(owners, 1);
            }
        }
    }

    /// With two shards, keys that differ in one byte must not land in opposite shards every time
    /// (plain FNV-1a does exactly that: its lowest bit is the parity of the bytes' lowest bits),
    /// and every shard gets about its share.
    #[test]
    fn shard_hash_mixes_its_low_bits() {
        let n = 1000;
        let same = (0..n)
            .filter(|i| {
                shard_hash(Path::new(&format!("a/img_{i}.jpg"))) % 2
                    == shard_hash(Path::new(&format!("b/img_{i}.jpg"))) % 2
            })
            .count();
        assert!((400..=600).contains(&same), "{same} of {n} keys kept their shard");
        for count in [2u64, 3, 8] {
            let mut sizes = vec![0usize; count as usize];
            for i in 0..n {
                sizes[(shard_hash(Path::new(&format!("img_{i:05}.png"))) % count) as usize] += 1;
            }
            let share = n / count as usize;
            assert!(
                sizes.iter().all(|&s| s.abs_diff(share) * 5 < share),
                "{count} shards: {sizes:?}"
            );
        }
    }

    /// The hash is of the key's components joined with `/`, so it is the same on every platform
    /// and for every spelling of the separators.
    #[test]
    fn shard_hash_is_of_the_slash_joined_components() {
        assert_eq!(
            shard_hash(Path::new("a/b/c.jpg")),
            shard_hash(Path::new("a//b/./c.jpg"))
        );
        assert_ne!(shard_hash(Path::new("a/b/c.jpg")), shard_hash(Path::new("ab/c.jpg")));
        assert_eq!(shard_hash(Path::new("/x/y.png")), shard_hash(Path::new("//x/y.png")));
        // FNV-1a of "a/b" then the finalizer, computed by hand.
        assert_eq!(shard_hash(Path::new("a/b")), finalized_fnv(b"a/b"));
    }

    fn finalized_fnv(bytes: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf29ce484222325;
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        h = (h ^ (h >> 33)).wrapping_mul(0xff51afd7ed558ccd);
        h = (h ^ (h >> 33)).wrapping_mul(0xc4ceb9fe1a85ec53);
        h ^ (h >> 33)
    }

    #[test]
    fn shard_specs_parse() {
        assert_eq!("3/8".parse::<Shard>(), Ok(Shard { index: 3, count: 8 }));
        assert!("8/8".parse::<Shard>().unwrap_err().contains("below the count"));
        assert!("x/8".parse::<Shard>().unwrap_err().contains("not a number"));
        assert!("3".parse::<Shard>().unwrap_err().contains("expected I/N"));
    }

    fn resolve(spec: &str, vars: &[(&str, &str)]) -> Result<Shard, String> {
        let spec: ShardSpec = spec.parse()?;
        spec.resolve(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn auto_reads_each_scheduler() {
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert_eq!(resolve("auto", &slurm), Shard::new(2, 4));
        let stepped = [
            ("SLURM_ARRAY_TASK_ID", "20"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_STEP", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert_eq!(resolve("auto", &stepped), Shard::new(2, 3));
        assert!(resolve("auto/5", &slurm).unwrap_err().contains("there are 4 shards"));
        assert_eq!(resolve("auto/6", &[("JOB_COMPLETION_INDEX", "5")]), Shard::new(5, 6));
        assert!(resolve("auto", &[("JOB_COMPLETION_INDEX", "5")])
            .unwrap_err()
            .contains("pass --shard auto/N"));
        assert_eq!(resolve("auto", &[("RANK", "1"), ("WORLD_SIZE", "2")]), Shard::new(1, 2));
        assert!(resolve("auto", &[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .contains("below the count"));
        assert!(resolve("auto", &[("RANK", "x")])
            .unwrap_err()
            .contains("RANK=\"x\" is not a number"));
        let none = resolve("auto", &[]).unwrap_err();
        assert!(none.contains("SLURM_ARRAY_TASK_ID") && none.contains("JOB_COMPLETION_INDEX") && none.contains("RANK"));
        assert_eq!(resolve("2/3", &slurm), Shard::new(2, 3));
        assert!("auto/0".parse::<ShardSpec>().is_err());
        assert!("autox".parse::<ShardSpec>().is_err());
    }

    /// Every Slurm array task of an array gets its own shard, and together they cover the input.
    #[test]
    fn an_array_partitions_the_input() {
        let images: Vec<InputImage> = (0..300).map(|i| image(&format!("x/{i}.png"))).collect();
        let mut owners = vec![0; images.len()];
        for id in 100..108 {
            let id = id.to_string();
            let vars = [
                ("SLURM_ARRAY_TASK_ID", id.as_str()),
                ("SLURM_ARRAY_TASK_MIN", "100"),
                ("SLURM_ARRAY_TASK_COUNT", "8"),
            ];
            let shard = resolve("auto", &vars).unwrap();
            for (i, img) in images.iter().enumerate() {
                owners[i] += shard.contains(img) as usize;
            }
        }
        assert!(owners.iter().all(|&n| n == 1));
    }
}
