//! The emulators tested on their own, over HTTP: what they answer is what
//! the real services answer, faults included.

mod amocrm;
mod amocrm_events;
mod amocrm_leads;
mod bitrix24;
mod bitrix24_history;
mod bitrix24_leads;
mod playground;
