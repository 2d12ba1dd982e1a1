//! [`InlineFuture`]: a type-erased future stored in a fixed buffer inside the value
//! itself, so a trait object's async method can return a future without boxing it.
//!
//! Driver traits are called through `dyn` (the consumer API does not know which driver
//! it talks to), and an `async fn` in a trait object would need a `Box` per call — an
//! allocation per I/O. Instead a driver wraps its future in `InlineFuture::new`: the
//! future is moved into the buffer and a pair of function pointers (poll, drop) stands
//! in for its type. The capacity is a const parameter; a future that does not fit is a
//! compile-time error (a post-monomorphization `const` assertion), so a driver whose
//! request state grows past what its callers budget for is caught at build time, as
//! SPDK's per-driver context size is checked at registration.

use std::future::Future;
use std::marker::{PhantomData, PhantomPinned};
use std::mem::{MaybeUninit, align_of, size_of};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Alignment of the inline buffer; futures needing more are refused at compile time.
const ALIGN: usize = 16;

#[repr(C, align(16))]
struct Buf<const N: usize>([MaybeUninit<u8>; N]);

const _: () = assert!(align_of::<Buf<0>>() == ALIGN);

/// A future of output `T` stored inline in `N` bytes, valid for `'a`.
pub struct InlineFuture<'a, T, const N: usize> {
    buf: Buf<N>,
    poll: unsafe fn(*mut u8, &mut Context<'_>) -> Poll<T>,
    drop: unsafe fn(*mut u8),
    /// Borrows whatever the future borrows; `!Send` like the reactor's tasks; pinned
    /// once polled (the future lives at the buffer's address).
    _marker: PhantomData<(&'a (), *mut ())>,
    _pin: PhantomPinned,
}

unsafe fn poll_as<T, F: Future<Output = T>>(p: *mut u8, cx: &mut Context<'_>) -> Poll<T> {
    // SAFETY: `p` holds an initialised `F` that never moves (the InlineFuture is
    // pinned while polled: `Future::poll` takes `Pin<&mut Self>`).
    unsafe { Pin::new_unchecked(&mut *p.cast::<F>()).poll(cx) }
}

unsafe fn drop_as<F>(p: *mut u8) {
    // SAFETY: `p` holds an initialised `F`, dropped exactly once (from `Drop`).
    unsafe { std::ptr::drop_in_place(p.cast::<F>()) }
}

impl<'a, T, const N: usize> InlineFuture<'a, T, N> {
    /// Stores `f` inline. Fails to compile if `F` is larger than `N` bytes or needs an
    /// alignment above 16.
    pub fn new<F: Future<Output = T> + 'a>(f: F) -> Self {
        const {
            assert!(size_of::<F>() <= N, "future too large for this InlineFuture's capacity");
            assert!(align_of::<F>() <= ALIGN, "future over-aligned for InlineFuture");
        }
        let mut buf = Buf([MaybeUninit::uninit(); N]);
        // SAFETY: the buffer is large and aligned enough for `F` (checked above) and
        // holds nothing yet.
        unsafe { std::ptr::write(buf.0.as_mut_ptr().cast::<F>(), f) };
        InlineFuture {
            buf,
            poll: poll_as::<T, F>,
            drop: drop_as::<F>,
            _marker: PhantomData,
            _pin: PhantomPinned,
        }
    }

    /// A future that is ready with `v` at once (no state to store).
    pub fn ready(v: T) -> Self
    where
        T: 'a,
    {
        Self::new(std::future::ready(v))
    }
}

impl<T, const N: usize> Future for InlineFuture<'_, T, N> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // SAFETY: nothing is moved out of `self`; the stored future stays at its address
        // for as long as `self` is pinned.
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: `poll` matches the type written into the buffer by `new`.
        unsafe { (this.poll)(this.buf.0.as_mut_ptr().cast(), cx) }
    }
}

impl<T, const N: usize> Drop for InlineFuture<'_, T, N> {
    fn drop(&mut self) {
        // SAFETY: `drop` matches the stored type; the future is dropped in place once.
        unsafe { (self.drop)(self.buf.0.as_mut_ptr().cast()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    fn block_on<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    struct Yield(bool);
    impl Future for Yield {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                Poll::Ready(())
            } else {
                self.0 = true;
                Poll::Pending
            }
        }
    }

    #[test]
    fn runs_borrows_and_drops_the_stored_future() {
        let data = [1u64, 2, 3];
        let dropped = Rc::new(Cell::new(0));
        let guard = {
            struct D(Rc<Cell<u32>>);
            impl Drop for D {
                fn drop(&mut self) {
                    self.0.set(self.0.get() + 1);
                }
            }
            D(dropped.clone())
        };
        let f: InlineFuture<'_, u64, 256> = InlineFuture::new(async {
            let _g = guard;
            Yield(false).await;
            data.iter().sum::<u64>()
        });
        assert_eq!(block_on(f), 6);
        assert_eq!(dropped.get(), 1, "the future's state was dropped once");
        // Dropped before completion: its state is dropped too.
        let d2 = dropped.clone();
        let g2 = {
            struct D(Rc<Cell<u32>>);
            impl Drop for D {
                fn drop(&mut self) {
                    self.0.set(self.0.get() + 10);
                }
            }
            D(d2)
        };
        let f: InlineFuture<'_, (), 256> = InlineFuture::new(async move {
            let _g = g2;
            Yield(false).await;
        });
        drop(f);
        assert_eq!(dropped.get(), 11);
        assert_eq!(block_on(InlineFuture::<'_, u8, 16>::ready(7)), 7);
    }
}
