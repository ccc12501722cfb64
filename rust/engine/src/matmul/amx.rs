//! The AMX tile kernels (Sapphire Rapids and later, `Level::Amx`): bf16 (`tdpbf16ps`) and
//! u8 x i8 (`tdpbusd`) products on 32 x 32 tiles of sums. There are no AMX intrinsics in
//! stable Rust, so the tile instructions are written out in `asm!`.
//!
//! Eight tile registers of 16 rows x 64 bytes: tmm0-3 hold the 2 x 2 tiles of 16 x 16 sums
//! (f32 or i32), tmm4-5 the queries (16 rows x 32 bf16 / 64 u8 each) and tmm6-7 the stored
//! rows (16 lane steps x 16 rows x one bf16 pair / 4 bytes).
//!
//! Operand layouts, as `PackedQueries` and the stored-row packing write them:
//! - queries (A): lane steps of `Shape::g` values (32 bf16 / 64 u8, 64 bytes), 32 queries
//!   per step: the 16 rows of a query tile are 1 KiB contiguous;
//! - stored rows (B): lane steps of one bf16 pair / 4 bytes, 32 rows per step (128 bytes),
//!   as the vector kernels read them: a tile is 16 steps at a stride of 128 bytes, the left
//!   or right 16 rows.
//!
//! Both products are summed as the vector kernels sum them (bf16 products in f32, u8 x i8
//! in exact i32), and stored by the same code (`x86::store_f32_sums`, `x86::store_i8_sums`).

use super::x86::{self, I8Out};
use super::Tile;
use std::arch::asm;
use std::arch::x86_64::*;

/// Bytes of one lane step of a 32-row panel (queries or stored rows): 32 x 64 / 16 x 128.
const STEP_BYTES: usize = 2048;

/// The tile configuration of every kernel here: palette 1, all eight tiles 16 rows x 64
/// bytes (`ldtilecfg`'s 64-byte operand).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1; // palette
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row (u16, little end)
        c[48 + t] = 16; // rows
        t += 1;
    }
    TileConfig(c)
};

/// The tile unit configured for the kernels here on this thread, released when dropped:
/// hold one around a run of kernel calls.
pub struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// # Safety
    /// The CPU has AMX and the process was granted its state (`kernels::has_amx`).
    pub unsafe fn configure() -> Tiles {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
        Tiles(std::marker::PhantomData)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a `Tiles` exists only after `configure` succeeded on this thread (it is
        // neither Send nor Sync: the raw marker below); tilerelease returns the tile state to
        // its initial (unused) form, so the next context switch saves none of it.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Row-major 32 x 32 sums (f32 or i32 bits), as the tile stores leave them.
#[repr(C, align(64))]
struct Sums([u32; 32 * 32]);

impl Sums {
    /// Uninitialized: the tile stores write every value before any is read.
    fn new() -> std::mem::MaybeUninit<Sums> {
        std::mem::MaybeUninit::uninit()
    }
}

/// `sums = A . B` over `steps` lane steps with `op` (`tdpbf16ps` / `tdpbusd`), the 2 x 2
/// tiles as in the module's doc.
macro_rules! tile_product {
    ($op:literal, $a:expr, $b:expr, $steps:expr, $sums:expr) => {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a} + {s64}*1]",
            "tileloadd tmm5, [{a} + {s64}*1 + 1024]",
            "tileloadd tmm6, [{b} + {s128}*1]",
            "tileloadd tmm7, [{b} + {s128}*1 + 64]",
            concat!($op, " tmm0, tmm4, tmm6"),
            concat!($op, " tmm1, tmm4, tmm7"),
            concat!($op, " tmm2, tmm5, tmm6"),
            concat!($op, " tmm3, tmm5, tmm7"),
            "add {a}, {step}",
            "add {b}, {step}",
            "dec {n}",
            "jnz 2b",
            "tilestored [{c} + {s128}*1], tmm0",
            "tilestored [{c} + {s128}*1 + 64], tmm1",
            "tilestored [{c} + {s128}*1 + 2048], tmm2",
            "tilestored [{c} + {s128}*1 + 2112], tmm3",
            a = inout(reg) $a => _,
            b = inout(reg) $b => _,
            n = inout(reg) $steps => _,
            c = in(reg) $sums,
            s64 = in(reg) 64usize,
            s128 = in(reg) 128usize,
            step = const STEP_BYTES,
            options(nostack),
        )
    };
}

/// One 32 x 32 tile of the bf16 product into `c` (the matrix's origin, stride `ldc`).
///
/// # Safety
/// AMX-BF16 and AVX-512F, the tiles configured on this thread ([`Tiles`]); the tile's panels
/// hold `steps >= 1` lane steps as the module's doc lays out; `c` valid for reads and writes at
/// the tile's valid rows and columns, the only ones written.
#[target_feature(enable = "avx512f")]
pub unsafe fn bf16_32x32(t: &Tile<u16, u16>, c: *mut f32, ldc: usize) {
    let mut sums = Sums::new();
    debug_assert!(t.steps >= 1);
    let p = sums.as_mut_ptr() as *mut f32;
    tile_product!("tdpbf16ps", t.a, t.b, t.steps, p);
    x86::store_f32_sums(t, c, ldc, |r| {
        (
            _mm512_load_ps(p.add(32 * r)),
            _mm512_load_ps(p.add(32 * r + 16)),
        )
    });
}

/// One 32 x 32 tile of the u8 x i8 product, stored as [`x86::i8_12x32`] stores.
///
/// # Safety
/// AMX-INT8 and AVX-512F/BW, the tiles configured on this thread ([`Tiles`]); the tile's
/// panels hold `steps >= 1` lane steps as the module's doc lays out; `out`'s matrices are
/// valid for the tile's rows and columns (`ints` when `multi`).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn i8_32x32(t: &Tile<u8, i8>, out: &I8Out, multi: bool) {
    let mut sums = Sums::new();
    debug_assert!(t.steps >= 1);
    let p = sums.as_mut_ptr() as *mut __m512i;
    tile_product!("tdpbusd", t.a, t.b, t.steps, p);
    x86::store_i8_sums(t, out, multi, |r| {
        (
            _mm512_load_si512(p.add(2 * r)),
            _mm512_load_si512(p.add(2 * r + 1)),
        )
    });
}
