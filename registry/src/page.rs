//! Paging, the same for every backend: the page size asked for within bounds, one row
//! fetched beyond it to know whether another page follows, and the error for a cursor
//! that no listing gave out.

use crate::error::StoreError;
use crate::model::{Page, PageRequest};

/// Largest page.
pub(crate) const MAX_PAGE: u32 = 1000;

/// The rows a page holds: what was asked for, between 1 and [`MAX_PAGE`].
pub(crate) fn page_size(page: &PageRequest) -> usize {
    page.limit.clamp(1, MAX_PAGE) as usize
}

/// A page from `items` fetched with one row beyond `size`: that row, when present, only
/// says that a next page exists, whose cursor is made from the page's last item.
pub(crate) fn finish_page<T>(
    mut items: Vec<T>,
    size: usize,
    cursor: impl Fn(&T) -> String,
) -> Page<T> {
    let more = items.len() > size;
    items.truncate(size);
    let next = if more { items.last().map(cursor) } else { None };
    Page { items, next }
}

/// The error for a cursor that is not one a previous page gave out.
pub(crate) fn bad_cursor(raw: &str) -> StoreError {
    StoreError::Invalid {
        field: "after",
        message: format!(
            "{raw:?} is not a cursor from a previous page of this listing: leave it out to start from the first page"
        ),
    }
}
